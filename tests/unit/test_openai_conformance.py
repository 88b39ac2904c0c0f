"""The images API against OpenAI's published OpenAPI schemas (tests/openai_images_schemas.json).

Live responses of the HTTP layer over the in-process stages (no Ray; the Ray app gets one check
in tests/integration/test_api.py): image responses (b64_json and url, n=1 and n=3), every error
status the API returns, ``/v1/models``; and every request field of OpenAI's
``CreateImageRequest``, each accepted or refused with a 400 naming it, none "unknown".
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.api import Limits, parse_generation_request
from serve.api.http import create_app
from serve.api.local_stages import LocalStages
from serve.api.policy import PromptPolicy
from serve.api.service import ImageService, ServiceConfig
from serve.errors import InvalidRequestError, OverloadedError
from serve.imageio import decode_image
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.storage import open_store
from tests.conftest import max_level_diff
from tests.openai_spec import document, errors, request_fields, schema
from tests.sse import parse_events

# Cheap requests: every accepted one runs the tiny model for real.
CHEAP = {"num_inference_steps": 1, "size": "64x64"}
MAX_STEPS = 4  # this server's limit: quality presets (20..50 steps) are capped to it


class FaultyStages(LocalStages):
    """The in-process stages, with faults switched on per test: an overloaded stage, a stage
    that never answers (it waits on an event nobody sets: no guessed timing), an internal error."""

    fault: str | None = None

    async def encode(self, texts):
        if self.fault == "overloaded":
            raise OverloadedError("TextEncoder is at capacity; retry shortly")
        if self.fault == "stuck":
            await asyncio.Event().wait()  # never set: past any request limit
        if self.fault == "crash":
            raise RuntimeError("simulated bug")
        return await super().encode(texts)


def _checker(prompt: str) -> str | None:
    """A stand-in classifier for the moderation test: refuses prompts mentioning 'volcano'."""
    return "classifier says no" if "volcano" in prompt else None


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    storage = tmp_path_factory.mktemp("conformance")
    store = open_store(str(storage))
    config = ServiceConfig(
        model_name="tiny",
        limits=Limits(max_steps=MAX_STEPS, max_side=512, max_n=10),
        request_timeout_s=120,
        api_keys=("k",),
        max_body_bytes=4096,
        prompt_policy=PromptPolicy(blocklist=("forbidden",), checker=f"{__name__}:_checker"),
    )
    stages = FaultyStages(Pipeline.load(tiny_model, device="cpu"), store)
    service = ImageService(config, read_model_info(tiny_model), stages, store)
    client = TestClient(create_app(service), headers={"Authorization": "Bearer k"}, raise_server_exceptions=False)
    with client:
        yield {"client": client, "stages": stages, "storage": storage, "service": service}
    stages.fault = None


def post(env, body, **kw):
    return env["client"].post("/v1/images/generations", json=body, **kw)


def assert_request_valid(body):
    """What the test sends is a valid request by OpenAI's schema (Darkroom's extensions are
    extra properties, which the schema allows)."""
    assert errors("CreateImageRequest", body) == [], body


def assert_images_response(r, n):
    assert r.status_code == 200, r.text
    body = r.json()
    assert errors("ImagesResponse", body) == []
    assert len(body["data"]) == n
    for i, item in enumerate(body["data"]):
        assert None not in item.values(), item  # fields Darkroom does not fill are absent
        assert item["index"] == i
    return body


def test_pinned_schemas_name_their_source():
    source = document()["source"]
    assert source["repository"] == "https://github.com/openai/openai-openapi"
    assert len(source["commit"]) == 40 and source["file"] == "openapi.json" and source["api_version"]
    for name in ("CreateImageRequest", "ImagesResponse", "Image", "ErrorResponse", "ListModelsResponse",
                 "ImageGenStreamEvent", "ImageGenPartialImageEvent", "ImageGenCompletedEvent"):  # fmt: skip
        assert schema(name)


def test_the_old_revised_prompt_null_fails_the_schema():
    """The validator sees what the issue saw: a null where the spec wants a string fails."""
    bad = {"created": 1, "data": [{"url": "http://x/a.png", "revised_prompt": None}]}
    assert any("revised_prompt" in e for e in errors("ImagesResponse", bad))


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
@pytest.mark.parametrize("n", [1, 3])
def test_image_responses_match_the_schema(env, response_format, n):
    body = {"prompt": "a small boat", "n": n, "seed": 21, "response_format": response_format, **CHEAP}
    assert_request_valid(body)
    out = assert_images_response(post(env, body), n)
    for item in out["data"]:
        assert item["seed"] == 21
        assert ("b64_json" in item) == (response_format == "b64_json") and ("url" in item) == (response_format == "url")
    if response_format == "url":
        r = env["client"].get(out["data"][0]["url"])
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_each_image_is_reproduced_by_its_seed_and_index(env, reference):
    """Image i of (seed s, n) is image i of the request sent again with s and n: the seed and
    index in the response are all a client needs, and they match diffusers' own pipeline."""
    body = {"prompt": "a red kite", "n": 3, "seed": 77, "response_format": "b64_json", **CHEAP}
    first = assert_images_response(post(env, body), 3)["data"]
    again = assert_images_response(post(env, body), 3)["data"]
    pixels = [decode_image(base64.b64decode(d["b64_json"])) for d in first]
    for item, repeat, px in zip(first, again, pixels, strict=True):
        assert (repeat["seed"], repeat["index"]) == (item["seed"], item["index"])
        assert np.array_equal(decode_image(base64.b64decode(repeat["b64_json"])), px)
    assert not np.array_equal(pixels[0], pixels[1])  # the index matters: one seed, n different images
    params = parse_generation_request({k: v for k, v in body.items() if k != "response_format"}).to_params(
        default_size=(64, 64)
    )
    assert max_level_diff(np.stack(pixels), reference(params)) <= 3


def test_models_matches_the_schema(env):
    r = env["client"].get("/v1/models")
    assert r.status_code == 200 and errors("ListModelsResponse", r.json()) == []
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]


def _error(r, status):
    assert r.status_code == status, r.text
    assert errors("ErrorResponse", r.json()) == [], r.text
    return r.json()["error"]


def test_every_error_status_matches_the_schema(env):
    client, stages = env["client"], env["stages"]
    seen = {}
    seen[400] = _error(post(env, {"prompt": "a", "n": 0}), 400)
    seen[401] = _error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    seen[404] = _error(post(env, {"prompt": "a", "model": "dall-e-3"}), 404)
    assert _error(client.get("/v1/images/jobs/0123456789abcdef"), 404)["code"] == "not_found"
    assert _error(client.get("/v1/files/images/none.png"), 404)
    assert _error(client.get("/no/such/route"), 404)
    r = client.delete("/v1/images/generations")
    seen[405] = _error(r, 405)
    assert r.headers["allow"] == "POST"
    key = {"Idempotency-Key": "conformance-409"}
    assert post(env, {"prompt": "first", **CHEAP}, headers=key).status_code == 200
    seen[409] = _error(post(env, {"prompt": "other", **CHEAP}, headers=key), 409)
    seen[413] = _error(post(env, {"prompt": "x" * 5000}), 413)
    try:
        stages.fault = "overloaded"
        r = post(env, {"prompt": "busy", **CHEAP})
        seen[503] = _error(r, 503)
        assert r.headers["retry-after"].isdigit()
        stages.fault = "stuck"
        # A service sharing these stages with a 0.5 s request limit: the stuck stage outlasts it.
        svc = env["service"]
        short = ImageService(replace(svc.config, request_timeout_s=0.5), svc.info, stages, svc.store)
        quick = TestClient(create_app(short), headers={"Authorization": "Bearer k"})
        seen[504] = _error(quick.post("/v1/images/generations", json={"prompt": "stuck", **CHEAP}), 504)
        stages.fault = "crash"
        seen[500] = _error(post(env, {"prompt": "crash", **CHEAP}), 500)
    finally:
        stages.fault = None
    assert sorted(seen) == [400, 401, 404, 405, 409, 413, 500, 503, 504]
    assert seen[400]["param"] == "n" and seen[404]["param"] == "model"


def test_head_works_where_get_does_on_files(env):
    url = post(env, {"prompt": "a hill", **CHEAP}).json()["data"][0]["url"]
    get, head = env["client"].get(url), env["client"].head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == get.headers["content-type"] == "image/png"
    assert env["client"].head("/v1/files/images/none.png").status_code == 404


# --- every request field of OpenAI's CreateImageRequest ------------------------------------


def _spec_values(prop):
    """Values OpenAI's schema allows for a field: every enum value, both booleans, an integer
    range's ends, else its example or default; and null where the field is nullable."""
    if "$ref" in prop:
        prop = schema(prop["$ref"].rsplit("/", 1)[-1])
    options = prop.get("anyOf", [prop])
    values = [v for o in options for v in o.get("enum", [])]
    for o in options:
        if o.get("type") == "boolean":
            values += [False, True]
        if o.get("type") == "integer":
            values += [o[k] for k in ("minimum", "maximum") if k in o]
    if not values:
        values = [prop.get("example", prop.get("default"))] + [o.get("example") for o in options]
    if prop.get("nullable") or any(o.get("type") == "null" for o in options):
        values.append(None)
    unique = []
    for v in values:
        if not any(v == u and type(v) is type(u) for u in unique):
            unique.append(v)
    return unique


def _cases():
    cases = []
    for name, prop in request_fields().items():
        for value in _spec_values(prop):
            if name == "model" and value is not None:
                continue  # the served model's id: below (OpenAI's own ids are a 404 naming model)
            cases.append((name, value))
    return cases + [("model", "tiny"), ("model", "darkroom")]


@pytest.mark.parametrize(("field", "value"), _cases(), ids=lambda v: repr(v))
def test_every_spec_request_field_is_accepted_or_refused_by_name(env, field, value):
    body = {"prompt": "a lighthouse at dusk", "seed": 3, **CHEAP, field: value}
    assert_request_valid(body)
    r = post(env, body)
    if r.status_code == 200 and body.get("stream"):
        events = list(parse_events(r.text.splitlines()))
        assert [name for name, _ in events] == ["image_generation.completed"]
        assert all(errors("ImageGenStreamEvent", data) == [] for _, data in events)
        return
    if r.status_code == 200:
        assert_images_response(r, body.get("n") or 1)
        return
    err = _error(r, 400)
    assert err["param"] == field, err
    assert "unknown field" not in err["message"], err


# Which spec values Darkroom refuses (each with a 400 naming the field) -- the rest are served.
REFUSED = {
    ("style", "vivid"),
    ("style", "natural"),
    ("background", "transparent"),
    ("size", "1024x1024"),  # over this test server's max_side of 512
    ("size", "1536x1024"),
    ("size", "1024x1536"),
    ("size", "1792x1024"),
    ("size", "1024x1792"),
}


def test_refused_spec_values_are_exactly_the_documented_ones(env):
    refused = set()
    for field, value in _cases():
        try:  # parse only: whether the field is accepted, without a whole generation
            env["service"].parse({"prompt": "a lighthouse at dusk", **CHEAP, field: value})
        except InvalidRequestError as exc:
            assert exc.field == field, (field, value, exc)
            refused.add((field, value))
    assert refused == REFUSED


def test_size_auto_is_the_models_default(env):
    out = post(env, {"prompt": "auto size", "size": "auto", "num_inference_steps": 1, "response_format": "b64_json"})
    native = env["service"].info.native_size
    img = decode_image(base64.b64decode(assert_images_response(out, 1)["data"][0]["b64_json"]))
    assert (img.shape[1], img.shape[0]) == native


@pytest.mark.parametrize(
    ("quality", "steps"),
    [("low", 20), ("medium", 30), ("high", 50), ("standard", 30), ("hd", 50), ("auto", 50), (None, 50)],
)
def test_quality_presets_and_explicit_steps_win(quality, steps):
    req = parse_generation_request({"prompt": "a", "quality": quality})
    assert req.to_params(default_size=(64, 64)).num_inference_steps == steps
    capped = req.to_params(default_size=(64, 64), limits=Limits(max_steps=25))
    assert capped.num_inference_steps == min(steps, 25)
    explicit = parse_generation_request({"prompt": "a", "quality": quality, "num_inference_steps": 7})
    assert explicit.to_params(default_size=(64, 64)).num_inference_steps == 7
    # A family with another default (Flux dev: 28 steps) gets the same shares of its own.
    flux = req.to_params(default_size=(64, 64), defaults={"num_inference_steps": 28, "guidance_scale": 3.5})
    assert flux.num_inference_steps == round(28 * steps / 50)


def test_quality_sets_the_steps_stored_with_the_image(env):
    r = post(env, {"prompt": "quality", "quality": "low", "size": "64x64"})
    meta = _metadata(env, r.json()["data"][0]["url"])
    assert meta["num_inference_steps"] == min(20, MAX_STEPS)


def _metadata(env, url):
    key = url.split("/v1/files/", 1)[1]
    return json.loads((env["storage"] / key).with_suffix(".json").read_text())


def test_output_compression_sets_the_encoders_quality(env):
    sizes = {}
    for fmt in ("jpeg", "webp"):
        for level in (5, 95):
            body = {"prompt": "a textured wall", "seed": 8, "output_format": fmt, "output_compression": level}
            r = post(env, {**body, **CHEAP, "response_format": "b64_json"})
            sizes[fmt, level] = len(base64.b64decode(assert_images_response(r, 1)["data"][0]["b64_json"]))
        assert sizes[fmt, 5] < sizes[fmt, 95], sizes
    url = post(env, {"prompt": "kept", "output_format": "jpeg", "output_compression": 40, **CHEAP}).json()
    assert _metadata(env, url["data"][0]["url"])["output_compression"] == 40


def test_moderation_low_skips_the_checker_but_not_the_blocklist(env):
    assert _error(post(env, {"prompt": "a volcano", **CHEAP}), 400)["code"] == "content_policy_violation"
    assert _error(post(env, {"prompt": "a volcano", "moderation": "auto", **CHEAP}), 400)["param"] == "prompt"
    assert post(env, {"prompt": "a volcano", "moderation": "low", **CHEAP}).status_code == 200
    assert _error(post(env, {"prompt": "a forbidden volcano", "moderation": "low", **CHEAP}), 400)["param"] == "prompt"


def test_user_is_recorded_in_the_metadata(env):
    r = post(env, {"prompt": "for a user", "user": "user-1234", **CHEAP})
    meta = _metadata(env, r.json()["data"][0]["url"])
    assert meta["user"] == "user-1234" and meta["index"] == 0
    assert meta["scheduler"] == "pndm"  # the name a client sends back, not PNDMScheduler


def test_n_up_to_the_spec_and_a_lower_server_limit_says_so(env):
    assert_images_response(post(env, {"prompt": "ten", "n": 10, **CHEAP}), 10)
    err = _error(post(env, {"prompt": "eleven", "n": 11}), 400)
    assert err["param"] == "n" and "this server" not in err["message"]
    with pytest.raises(Exception) as info:
        parse_generation_request({"prompt": "a", "n": 5}, Limits(max_n=4))
    assert info.value.field == "n" and "this server's limit" in info.value.reason


def test_refusals_explain_themselves():
    for body, field, words in [
        ({"style": "vivid"}, "style", "no styles"),
        ({"background": "transparent"}, "background", "opaque"),
        ({"output_compression": 50}, "output_compression", "jpeg and webp"),
    ]:
        with pytest.raises(Exception) as info:
            parse_generation_request({"prompt": "a", **body})
        assert info.value.field == field and words in info.value.reason, info.value
