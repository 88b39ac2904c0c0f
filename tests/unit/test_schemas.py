"""Request schema: every invalid request becomes ONE InvalidRequestError naming the field."""

from __future__ import annotations

import json
import typing

import pytest

from serve.api import (
    DEFAULT_LIMITS,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    Limits,
    parse_generation_request,
    parse_size,
)
from serve.errors import InvalidRequestError
from serve.params import MAX_SEED, OUTPUT_FORMATS, SCHEDULER_NAMES

OK = {"prompt": "a red fox in the snow"}


def body(**fields):
    """A valid request with ``fields`` changed (a value of ... removes the field)."""
    data = {**OK, **fields}
    return {k: v for k, v in data.items() if v is not ...}


# (id, request body, expected field)
INVALID = [
    ("prompt-missing", body(prompt=...), "prompt"),
    ("prompt-empty", body(prompt=""), "prompt"),
    ("prompt-whitespace", body(prompt="  \t\n "), "prompt"),
    ("prompt-too-long", body(prompt="x" * 2001), "prompt"),
    ("prompt-not-str", body(prompt=123), "prompt"),
    ("prompt-list", body(prompt=["a", "b"]), "prompt"),
    ("prompt-null", body(prompt=None), "prompt"),
    ("prompt-nul", body(prompt="a cat\x00"), "prompt"),
    ("n-zero", body(n=0), "n"),
    ("n-eleven", body(n=11), "n"),
    ("n-negative", body(n=-1), "n"),
    ("n-str", body(n="2"), "n"),
    ("n-bool", body(n=True), "n"),
    ("n-float", body(n=1.5), "n"),
    ("n-float-whole", body(n=2.0), "n"),
    ("steps-zero", body(num_inference_steps=0), "num_inference_steps"),
    ("steps-151", body(num_inference_steps=151), "num_inference_steps"),
    ("steps-str", body(num_inference_steps="50"), "num_inference_steps"),
    ("guidance-negative", body(guidance_scale=-1), "guidance_scale"),
    ("guidance-31", body(guidance_scale=31), "guidance_scale"),
    ("guidance-30.01", body(guidance_scale=30.01), "guidance_scale"),
    ("guidance-str", body(guidance_scale="7.5"), "guidance_scale"),
    ("guidance-bool", body(guidance_scale=True), "guidance_scale"),
    ("guidance-nan", body(guidance_scale=float("nan")), "guidance_scale"),
    ("guidance-inf", body(guidance_scale=float("inf")), "guidance_scale"),
    ("seed-negative", body(seed=-1), "seed"),
    ("seed-2**32", body(seed=2**32), "seed"),
    ("seed-str", body(seed="x"), "seed"),
    ("seed-numeric-str", body(seed="42"), "seed"),
    ("seed-bool", body(seed=False), "seed"),
    ("seed-float", body(seed=1.0), "seed"),
    ("size-not-multiple-of-8", body(size="100x100"), "size"),
    ("size-height-not-multiple-of-8", body(size="64x100"), "size"),
    ("size-one-number", body(size="64"), "size"),
    ("size-no-height", body(size="64x"), "size"),
    ("size-no-width", body(size="x64"), "size"),
    ("size-zero-width", body(size="0x64"), "size"),
    ("size-below-min", body(size="4x64"), "size"),
    ("size-too-wide", body(size="4096x64"), "size"),
    ("size-too-tall", body(size="2048x4096"), "size"),
    ("size-negative", body(size="-64x64"), "size"),
    ("size-leading-space", body(size=" 64x64"), "size"),
    ("size-trailing-newline", body(size="64x64\n"), "size"),
    ("size-uppercase-x", body(size="64X64"), "size"),
    ("size-star", body(size="64*64"), "size"),
    ("size-unicode-digits", body(size="\u0666\u0664x64"), "size"),
    ("size-huge-digits", body(size="9" * 5000 + "x64"), "size"),
    ("size-int", body(size=512), "size"),
    ("size-list", body(size=[512, 512]), "size"),
    ("scheduler-unknown", body(scheduler="foo"), "scheduler"),
    ("scheduler-case", body(scheduler="DDIM"), "scheduler"),
    ("scheduler-int", body(scheduler=1), "scheduler"),
    ("output-format-gif", body(output_format="gif"), "output_format"),
    ("output-format-upper", body(output_format="PNG"), "output_format"),
    ("response-format-xml", body(response_format="xml"), "response_format"),
    ("unknown-field", body(width=512), "width"),
    ("unknown-field-typo", {"promt": "a cat"}, "promt"),
    ("negative-prompt-too-long", body(negative_prompt="y" * 2001), "negative_prompt"),
    ("negative-prompt-not-str", body(negative_prompt=5), "negative_prompt"),
    ("negative-prompt-nul", body(negative_prompt="blur\x00"), "negative_prompt"),
    ("model-not-str", body(model=3), "model"),
    ("user-nul", body(user="u\x00"), "user"),
    ("quality-not-str", body(quality=1), "quality"),
    ("quality-unknown", body(quality="ultra"), "quality"),
    ("style-not-str", body(style=True), "style"),
    ("style-vivid", body(style="vivid"), "style"),
    ("style-natural", body(style="natural"), "style"),
    ("background-transparent", body(background="transparent"), "background"),
    ("background-unknown", body(background="green"), "background"),
    ("moderation-unknown", body(moderation="none"), "moderation"),
    ("stream-str", body(stream="yes"), "stream"),
    ("partial-images-4", body(partial_images=4), "partial_images"),
    ("partial-images-negative", body(partial_images=-1), "partial_images"),
    ("compression-101", body(output_compression=101, output_format="jpeg"), "output_compression"),
    ("compression-negative", body(output_compression=-1, output_format="webp"), "output_compression"),
    ("compression-png", body(output_compression=50), "output_compression"),
    ("compression-float", body(output_compression=50.0, output_format="jpeg"), "output_compression"),
    ("size-auto-upper", body(size="AUTO"), "size"),
]


@pytest.mark.parametrize(("data", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_request_names_field(data, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(data)
    err = info.value
    assert err.field == field
    assert err.message.startswith(f"{field}: ")
    assert field in str(err)
    assert err.status_code == 400
    assert err.to_openai()["error"]["param"] == field


@pytest.mark.parametrize(("data", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_request_as_json_bytes(data, field):
    """The raw-JSON path reports the same field (NaN/inf go through json's NaN extension)."""
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(json.dumps(data).encode())
    assert info.value.field == field


INVALID_BODIES = [
    ("not-json", b"prompt=a+cat"),
    ("truncated-json", '{"prompt": "a cat"'),
    ("empty", b""),
    ("bad-utf8", b'{"prompt": "\xff"}'),
    ("deeply-nested", "[" * 100_000 + "]" * 100_000),
    ("json-list", b'[{"prompt": "a cat"}]'),
    ("json-string", '"a cat"'),
    ("json-null", b"null"),
    ("json-number", b"42"),
    ("python-list", [OK]),
    ("python-none", None),
]


@pytest.mark.parametrize("data", [c[1] for c in INVALID_BODIES], ids=[c[0] for c in INVALID_BODIES])
def test_invalid_body(data):
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(data)
    assert info.value.field == "body"
    assert str(info.value).startswith("body: ")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (body(size="100x64"), "size: width must be a multiple of 8 (got '100x64')"),
        (body(size="64x100"), "size: height must be a multiple of 8 (got '64x100')"),
        (body(size="0x64"), "size: width must be at least 8 (got '0x64')"),
        (body(size="4096x64"), "size: width must be at most 2048 (got '4096x64')"),
        (body(size="64"), "size: must be 'WIDTHxHEIGHT' in pixels, e.g. '512x512' (got '64')"),
        (body(n=11), "n: must be at most 10 (got 11)"),
        (body(n=0), "n: must be at least 1 (got 0)"),
        (body(n="2"), "n: must be an integer, not a string (got '2')"),
        (body(n=True), "n: must be an integer, not a boolean (got True)"),
        (body(prompt="  "), "prompt: must not be empty or only whitespace (got '  ')"),
        (body(prompt=None), "prompt: must be a string, not null (got None)"),
        (body(prompt=...), "prompt: field required (got None)"),
        (body(seed=2**32), "seed: must be at most 4294967295 (got 4294967296)"),
        (body(guidance_scale=31), "guidance_scale: must be at most 30 (got 31)"),
        (body(response_format="xml"), "response_format: must be 'url' or 'b64_json' (got 'xml')"),
        (body(width=512), "width: unknown field (got 512)"),
        ({"promt": "a cat"}, "promt: unknown field (did you mean 'prompt'?) (got 'a cat')"),
    ],
)
def test_error_messages_are_clear(data, message):
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(data)
    assert str(info.value) == message


def test_error_keeps_value_sent():
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(body(num_inference_steps=151))
    assert info.value.value == 151
    assert info.value.reason == "must be at most 150"


def test_long_values_are_truncated_in_message():
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(body(prompt="x" * 5000))
    assert "must be at most 2000 characters, is 5000" in str(info.value)
    assert len(str(info.value)) < 200


def test_first_offending_field_is_reported():
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(body(prompt="", n=0, seed=-1))
    assert info.value.field == "prompt"


def test_unknown_field_is_reported_before_other_errors():
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request({"n": 0, "colour": "red"})
    assert info.value.field == "colour"


def test_direct_construction_also_validates():
    # Without parse_generation_request pydantic's own error surfaces, with default limits.
    with pytest.raises(ValueError):
        ImageGenerationRequest(prompt="a cat", n=11)


# Valid requests.


def test_minimal_request_defaults():
    req = parse_generation_request(OK)
    assert req.prompt == OK["prompt"]
    assert req.model is None
    assert req.n == 1
    assert req.size is None
    assert req.response_format == "url"
    assert req.output_format == "png"
    assert req.negative_prompt is None
    assert req.num_inference_steps == 50
    assert req.guidance_scale == 7.5
    assert req.seed is None
    assert req.scheduler is None


def test_full_request():
    data = {
        "model": "tiny-sd",
        "prompt": "a lighthouse",
        "n": 10,
        "size": "2048x2048",
        "response_format": "b64_json",
        "output_format": "webp",
        "output_compression": 80,
        "background": "opaque",
        "moderation": "low",
        "stream": False,
        "partial_images": 2,
        "user": "u-1",
        "quality": "hd",
        "style": None,
        "negative_prompt": "blurry",
        "num_inference_steps": 150,
        "guidance_scale": 30,
        "seed": MAX_SEED,
        "scheduler": "dpmpp_2m",
        "loras": [{"name": "watercolor", "scale": 0.8}, {"name": "ink", "scale": -4.0}],
    }
    req = parse_generation_request(data)
    assert req.model_dump() == {**data, "guidance_scale": 30.0, "true_cfg_scale": 1.0}
    assert isinstance(req.guidance_scale, float)


@pytest.mark.parametrize(
    "fields",
    [
        {"size": "8x8"},
        {"size": "512x768"},
        {"size": "0512x0512"},
        {"n": 1},
        {"num_inference_steps": 1},
        {"guidance_scale": 0},
        {"guidance_scale": 0.0},
        {"guidance_scale": 1},
        {"seed": 0},
        {"seed": None},
        {"negative_prompt": ""},
        {"prompt": "x" * 2000},
        {"prompt": "  leading and trailing spaces kept  "},
        {"prompt": "unicode: 雪の中の狐 🦊"},
        *({"scheduler": name} for name in SCHEDULER_NAMES),
        *({"output_format": fmt} for fmt in OUTPUT_FORMATS),
        {"response_format": "b64_json"},
    ],
)
def test_valid_requests(fields):
    req = parse_generation_request(body(**fields))
    for key, value in fields.items():
        assert getattr(req, key) == value


def test_null_means_default_for_openai_nullable_fields():
    req = parse_generation_request(
        body(n=None, response_format=None, output_format=None, num_inference_steps=None, guidance_scale=None)
    )
    assert (req.n, req.response_format, req.output_format) == (1, "url", "png")
    assert (req.num_inference_steps, req.guidance_scale) == (50, 7.5)


def test_raw_json_str_and_bytes():
    raw = json.dumps(body(n=2, seed=7))
    assert parse_generation_request(raw) == parse_generation_request(raw.encode())
    assert parse_generation_request(bytearray(raw.encode())).seed == 7
    assert parse_generation_request(memoryview(raw.encode())).n == 2


def test_caller_dict_not_mutated():
    data = body(n=None)
    parse_generation_request(data)
    assert data == body(n=None)


def test_output_formats_match_schema_literal():
    literal = ImageGenerationRequest.model_fields["output_format"].annotation
    assert typing.get_args(literal) == OUTPUT_FORMATS


def test_every_field_is_described():
    for model in (ImageGenerationRequest, Limits, ImageData, ImagesResponse, ErrorResponse):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


# Limits.


def test_custom_limits_shrink_max_side():
    limits = Limits(max_side=768)
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(body(size="1024x1024"), limits)
    assert info.value.field == "size"
    assert "width must be at most 768" in str(info.value)
    assert parse_generation_request(body(size="768x512"), limits).size == "768x512"


def test_custom_limits_pixels():
    limits = Limits(max_side=4096, max_pixels=1024 * 1024)
    assert parse_generation_request(body(size="4096x256"), limits).size == "4096x256"
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(body(size="2048x1024"), limits)
    assert info.value.field == "size"
    assert "width*height must be at most 1048576 pixels, is 2097152" in str(info.value)


def test_custom_limits_can_raise_bounds():
    limits = Limits(max_side=4096, max_pixels=4096 * 4096, max_n=16, max_steps=500, max_guidance=50)
    req = parse_generation_request(body(size="4096x4096", n=16, num_inference_steps=500, guidance_scale=50), limits)
    assert (req.n, req.num_inference_steps, req.guidance_scale) == (16, 500, 50.0)


@pytest.mark.parametrize(
    ("limits", "fields", "field"),
    [
        (Limits(max_prompt_chars=10), {"prompt": "x" * 11}, "prompt"),
        (Limits(max_prompt_chars=10), {"prompt": "cat", "negative_prompt": "x" * 11}, "negative_prompt"),
        (Limits(max_n=2), {"n": 3}, "n"),
        (Limits(max_steps=20), {"num_inference_steps": 21}, "num_inference_steps"),
        (Limits(max_guidance=10), {"guidance_scale": 10.5}, "guidance_scale"),
        (Limits(min_side=256), {"size": "128x512"}, "size"),
    ],
)
def test_custom_limits_enforced(limits, fields, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_generation_request(body(**fields), limits)
    assert info.value.field == field


@pytest.mark.parametrize(
    "kwargs",
    [{"max_side": 0}, {"min_side": 4}, {"min_side": 1024, "max_side": 512}, {"nonsense": 1}, {"max_n": 0}],
)
def test_limits_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_limits_defaults():
    assert DEFAULT_LIMITS == Limits()
    assert (DEFAULT_LIMITS.max_side, DEFAULT_LIMITS.max_pixels, DEFAULT_LIMITS.min_side) == (2048, 2048**2, 8)
    assert (DEFAULT_LIMITS.max_prompt_chars, DEFAULT_LIMITS.max_n) == (2000, 10)
    assert (DEFAULT_LIMITS.max_steps, DEFAULT_LIMITS.max_guidance) == (150, 30.0)


# parse_size (also used by the CLI).


@pytest.mark.parametrize(
    ("value", "expected"), [("512x512", (512, 512)), ("768x512", (768, 512)), ("8x2048", (8, 2048))]
)
def test_parse_size(value, expected):
    assert parse_size(value, DEFAULT_LIMITS) == expected


def test_parse_size_custom_field_name():
    with pytest.raises(InvalidRequestError) as info:
        parse_size("100x100", DEFAULT_LIMITS, field="--size")
    assert info.value.field == "--size"
    assert str(info.value) == "--size: width must be a multiple of 8 (got '100x100')"


def test_parse_size_rejects_non_str():
    with pytest.raises(InvalidRequestError):
        parse_size(512, DEFAULT_LIMITS)  # type: ignore[arg-type]
