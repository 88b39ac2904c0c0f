"""Request schema, continued: to_params resolution, GenerationParams and response models."""

from __future__ import annotations

import pytest

from serve.api import (
    ErrorResponse,
    ImageData,
    ImagesResponse,
    Limits,
    parse_generation_request,
)
from serve.errors import InvalidRequestError, ModelNotFoundError
from serve.params import MAX_SEED, OUTPUT_FORMATS, SCHEDULER_NAMES, GenerationParams, random_seed

OK = {"prompt": "a red fox in the snow"}


def body(**fields):
    """A valid request with ``fields`` changed (a value of ... removes the field)."""
    data = {**OK, **fields}
    return {k: v for k, v in data.items() if v is not ...}


# to_params.


def test_to_params_defaults():
    params = parse_generation_request(OK).to_params(default_size=(512, 768))
    assert isinstance(params, GenerationParams)
    assert (params.width, params.height) == (512, 768)
    assert params.prompt == OK["prompt"]
    assert params.negative_prompt is None
    assert params.num_inference_steps == 50
    assert params.guidance_scale == 7.5
    assert params.n == 1
    assert params.scheduler is None
    assert params.output_format == "png"
    assert 0 <= params.seed <= MAX_SEED


def test_to_params_explicit_values():
    req = parse_generation_request(
        body(
            size="256x128",
            n=3,
            seed=42,
            negative_prompt="blurry",
            num_inference_steps=20,
            guidance_scale=4,
            scheduler="euler_a",
            output_format="jpeg",
        )
    )
    params = req.to_params(default_size=(512, 512), seed=7)
    assert params == GenerationParams(
        prompt=OK["prompt"],
        negative_prompt="blurry",
        width=256,
        height=128,
        num_inference_steps=20,
        guidance_scale=4.0,
        seed=42,  # the request's seed wins over the fallback
        n=3,
        scheduler="euler_a",
        output_format="jpeg",
    )
    assert isinstance(params.guidance_scale, float)


def test_to_params_seed_fallback_and_random():
    req = parse_generation_request(OK)
    assert req.to_params(default_size=(64, 64), seed=123).seed == 123
    seeds = {req.to_params(default_size=(64, 64)).seed for _ in range(50)}
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert len(seeds) > 1


def test_to_params_limits_recheck():
    req = parse_generation_request(body(size="1024x1024", n=4))
    assert req.to_params(default_size=(512, 512)).width == 1024
    with pytest.raises(InvalidRequestError) as info:
        req.to_params(default_size=(512, 512), limits=Limits(max_side=512))
    assert info.value.field == "size"
    with pytest.raises(InvalidRequestError) as info:
        req.to_params(default_size=(512, 512), limits=Limits(max_n=2))
    assert info.value.field == "n"


def test_to_params_keeps_size_accepted_under_larger_limits():
    big = Limits(max_side=4096, max_pixels=4096 * 4096)
    req = parse_generation_request(body(size="4096x4096"), big)
    params = req.to_params(default_size=(512, 512))
    assert (params.width, params.height) == (4096, 4096)


def test_to_params_native_size_outside_limits():
    req = parse_generation_request(OK)
    with pytest.raises(InvalidRequestError) as info:
        req.to_params(default_size=(1024, 1024), limits=Limits(max_side=512))
    assert info.value.field == "size"
    assert "native size 1024x1024" in str(info.value)
    assert req.to_params(default_size=(512, 512), limits=Limits(max_side=512)).width == 512


# GenerationParams and helpers.


def test_random_seed_range():
    assert all(0 <= random_seed() <= 2**32 - 1 for _ in range(1000))


def test_scheduler_names():
    assert SCHEDULER_NAMES == ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "unipc")
    assert OUTPUT_FORMATS == ("png", "jpeg", "webp")


GOOD_PARAMS = dict(
    prompt="a cat",
    negative_prompt=None,
    width=512,
    height=512,
    num_inference_steps=20,
    guidance_scale=7.5,
    seed=1,
    n=1,
    scheduler=None,
    output_format="png",
)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 0}, "height"),
        ({"width": True}, "width"),
        ({"n": 0}, "n"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"scheduler": "foo"}, "scheduler"),
        ({"output_format": "gif"}, "output_format"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_generation_params_rejects_nonsense(change, field):
    with pytest.raises(InvalidRequestError) as info:
        GenerationParams(**{**GOOD_PARAMS, **change})
    assert info.value.field == field


def test_generation_params_frozen_and_hashable():
    params = GenerationParams(**GOOD_PARAMS)
    with pytest.raises(AttributeError):
        params.seed = 2  # type: ignore[misc]
    assert hash(params) == hash(GenerationParams(**GOOD_PARAMS))


# Response models.


def test_images_response_shape():
    resp = ImagesResponse(
        created=1700000000,
        data=[ImageData(url="http://x/1.png", seed=5, index=0), ImageData(b64_json="aGk=", seed=5, index=1)],
        timings={"denoise": 1.5},
    )
    dumped = resp.model_dump(exclude_none=True)
    assert dumped["data"][0] == {"url": "http://x/1.png", "seed": 5, "index": 0}
    assert "revised_prompt" not in ImageData.model_fields  # never filled, so never sent as null
    assert dumped["timings"] == {"denoise": 1.5}
    assert ImagesResponse(created=1, data=[]).timings == {}


def test_error_response_from_exception():
    err = InvalidRequestError("n", 9, "must be at most 8")
    resp = ErrorResponse.from_exception(err)
    assert resp.model_dump() == {
        "error": {
            "message": "n: must be at most 8 (got 9)",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_value",
        }
    }
    missing = ErrorResponse.from_exception(ModelNotFoundError("model", "sdxl", "not served here"))
    assert missing.error.code == "model_not_found"


def test_default_steps_fit_a_lower_server_limit():
    limits = Limits(max_steps=30)
    req = parse_generation_request({"prompt": "a cat"}, limits)
    assert req.to_params(default_size=(64, 64), limits=limits).num_inference_steps == 30
    assert req.to_params(default_size=(64, 64)).num_inference_steps == 50
    with pytest.raises(InvalidRequestError) as err:
        parse_generation_request({"prompt": "a cat", "num_inference_steps": 31}, limits)
    assert err.value.field == "num_inference_steps"
