"""ONNX export of the tiny model: the repository, the manifest, and each component vs torch.

Everything runs real ONNX Runtime (CPU) on real exported graphs; nothing is faked.
"""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch

from export import (
    ComponentSpec,
    component_specs,
    engine_key,
    export_model,
    file_sha256,
    parse_batch,
    parse_size,
    read_manifest,
    source_hash,
)
from export.onnx_export import load_component, verify_onnx
from serve.engines import load_engine, resolve_backend
from serve.engines.onnxruntime_backend import OnnxRuntimeEngine
from serve.errors import EngineError, InvalidRequestError
from serve.families import family_of
from serve.model import read_model_info

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def repo(tiny_model, tmp_path_factory):
    """The tiny model exported once per session path (a second module's export reuses it by content)."""
    messages: list[str] = []
    out = export_model(tiny_model, tmp_path_factory.getbasetemp() / "tiny-onnx", progress=messages.append)
    assert any("verifying" in m or "kept" in m for m in messages)
    return out


@pytest.fixture(scope="module")
def torch_modules(tiny_model):
    return {c: load_component(tiny_model, c) for c in ("text_encoder", "unet", "vae_decoder")}


def test_repository_layout_and_model_info(repo, tiny_model):
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert (repo / component / "model.onnx").is_file()
    for rel in (
        "manifest.json",
        "model_index.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (repo / rel).is_file(), rel
    assert not list(repo.rglob("*.safetensors")), "an exported repository carries no torch weights"
    got, want = read_model_info(repo), read_model_info(tiny_model)
    for field in ("family", "scheduler_config", "vae_scale_factor", "latent_channels", "native_size", "configs"):
        assert getattr(got, field) == getattr(want, field), field


def test_manifest_records_hashes_specs_and_tools(repo, tiny_model):
    manifest = read_manifest(repo)
    assert manifest["format_version"] == 1
    assert manifest["source"]["sha256"] == source_hash(tiny_model, ["text_encoder", "unet", "vae"])["sha256"]
    assert manifest["family"] == "sd"
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["source"]["files"]
    for tool in ("torch", "onnx", "onnxruntime", "diffusers"):
        assert manifest["tools"][tool], tool
    specs = component_specs(family_of(read_model_info(tiny_model)))
    for name, spec in specs.items():
        entry = manifest["components"][name]
        assert entry["onnx"]["sha256"] == file_sha256(repo / name / "model.onnx")
        assert ComponentSpec.from_dict(entry["spec"]) == spec
        errors = entry["verify"]["onnxruntime"]["max_abs_error"]
        assert set(errors) == {"min", "opt", "max"} and max(errors.values()) < 1e-3
    # The default profile of the tiny model (native 64 px): batch 1:1:4, size 32:64:128.
    unet = ComponentSpec.from_dict(manifest["components"]["unet"]["spec"])
    assert unet.profile["sample"] == ((1, 4, 4, 4), (2, 4, 8, 8), (8, 4, 16, 16))
    assert unet.profile["timestep"] == ((1,), (2,), (8,))
    vae = ComponentSpec.from_dict(manifest["components"]["vae_decoder"]["spec"])
    assert vae.profile["latent"] == ((1, 4, 4, 4), (1, 4, 8, 8), (4, 4, 16, 16))
    assert vae.output_shapes({"latent": (2, 4, 6, 8)}) == {"image": (2, 3, 48, 64)}


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_onnx_graph_io_is_the_spec(repo, component):
    spec = read_manifest(repo)["components"][component]["spec"]
    graph = onnx.load(str(repo / component / "model.onnx"), load_external_data=False).graph
    type_names = {1: "float32", 7: "int64", 10: "float16"}

    def described(values):
        return [
            {
                "name": v.name,
                "dtype": type_names[v.type.tensor_type.elem_type],
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    assert described(graph.input) == spec["inputs"]
    assert described(graph.output) == spec["outputs"]


# (component, input shapes): batch sizes in and beyond the profile, non-square and odd latents.
SHAPES = [
    ("text_encoder", {"input_ids": (1, 77)}),
    ("text_encoder", {"input_ids": (3, 77)}),
    ("unet", {"sample": (1, 4, 8, 8)}),
    ("unet", {"sample": (3, 4, 6, 8)}),
    ("unet", {"sample": (2, 4, 9, 7)}),  # 72x56 px: latents not a multiple of the UNet's 2x
    ("unet", {"sample": (4, 4, 16, 12)}),
    ("vae_decoder", {"latent": (1, 4, 8, 8)}),
    ("vae_decoder", {"latent": (2, 4, 6, 8)}),
    ("vae_decoder", {"latent": (1, 4, 9, 5)}),
]


@pytest.mark.parametrize(("component", "shapes"), SHAPES, ids=lambda v: str(v))
def test_onnxruntime_engine_matches_torch(repo, torch_modules, component, shapes):
    from export.onnx_export import random_inputs, vocab_size

    engine = load_engine("onnxruntime", read_model_info(repo), component, CPU, torch.float32)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.providers == ["CPUExecutionProvider"]
    module = torch_modules[component]
    b = next(iter(shapes.values()))[0]
    full = dict(shapes)
    if component == "unet":
        full.update(timestep=(b,), encoder_hidden_states=(b, 77, 32))
    inputs = random_inputs(engine.spec, full, seed=b, vocab=vocab_size(module))
    with torch.no_grad():
        (want,) = module(**inputs)
    (got,) = engine.run(**inputs).values()
    assert got.shape == want.shape and got.dtype == torch.float32 and got.device == CPU
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-4 * scale


def test_verification_catches_a_graph_that_differs_from_torch(repo, tiny_model):
    """The verifier must be able to fail: a torch module with one weight changed no longer matches."""
    spec = ComponentSpec.from_dict(read_manifest(repo)["components"]["vae_decoder"]["spec"])
    module = load_component(tiny_model, "vae_decoder")
    assert max(verify_onnx(module, spec, repo / "vae_decoder" / "model.onnx").values()) < 1e-3
    with torch.no_grad():
        module.model.decoder.conv_out.bias.add_(0.01)
    with pytest.raises(EngineError, match="differs from torch"):
        verify_onnx(module, spec, repo / "vae_decoder" / "model.onnx")


def test_engine_key_is_content_addressed():
    profile = {"sample": [(1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 16, 16)], "timestep": [(1,), (2,), (8,)]}
    base = dict(onnx_sha256="a" * 64, profile=profile, precision="fp16", trt_version="10.9.0", gpu_arch="sm_90")
    key = engine_key(**base)
    assert len(key) == 64 and key == engine_key(**base)
    assert engine_key(**{**base, "profile": dict(reversed(list(profile.items())))}) == key  # order-free
    wider = {**profile, "sample": [(1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 32, 32)]}
    changed = [
        {"profile": wider},
        {"precision": "fp32"},
        {"onnx_sha256": "b" * 64},
        {"trt_version": "10.10.0"},
        {"gpu_arch": "sm_89"},
    ]
    keys = {engine_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)


def test_reexport_keeps_unchanged_onnx(repo, tiny_model):
    messages: list[str] = []
    export_model(tiny_model, repo, progress=messages.append)
    assert sum("kept" in m for m in messages) == 3


def test_cli_export_with_profile_flags(repo, tiny_model, capsys):
    """``darkroom export`` prints each component's error; a changed profile means a fresh export."""
    from serve.cli import main

    other = repo.parent / "tiny-onnx-wide"
    args = ["export", "--model", tiny_model, "--out", str(other), "--batch", "1:2:3", "--size", "48:64:96x80"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    for name in ("text_encoder", "unet", "vae_decoder"):
        line = next(x for x in out.splitlines() if x.startswith(f"{name}: onnx max abs error"))
        assert float(line.rsplit(" ", 1)[1]) < 1e-3
        assert f"{name}: verifying" in err
    spec = ComponentSpec.from_dict(read_manifest(other)["components"]["unet"]["spec"])
    assert spec.profile["sample"] == ((1, 4, 6, 6), (4, 4, 8, 8), (6, 4, 10, 12))


def test_parse_batch_and_size():
    assert str(parse_batch("1:2:8")) == "1:2:8"
    s = parse_size("512x384:512x512:768x768")
    assert (s.width.min, s.height.min, s.height.max) == (512, 384, 768)
    assert str(parse_size("64:64:128")) == "64x64:64x64:128x128"
    for bad in ("4:2:1", "0:1:2", "1:2", "a:b:c"):
        with pytest.raises(InvalidRequestError) as err:
            parse_batch(bad)
        assert err.value.field == "batch"
    for bad in ("128:64:256", "64x64:32x64:128", "64", "64:64:12y8"):
        with pytest.raises(InvalidRequestError) as err:
            parse_size(bad)
        assert err.value.field == "size"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch": "4:2:1"}, "batch"),
        ({"size": "60:64:128"}, "size"),  # not a multiple of the VAE factor 8
        ({"fmt": "tflite"}, "format"),
        ({"precision": "int8"}, "precision"),
    ],
)
def test_bad_export_arguments_raise_typed_errors(tiny_model, tmp_path, kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        export_model(tiny_model, tmp_path / "out", **kwargs)
    assert err.value.field == field
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 ONNX export is allowed where CUDA exists")
def test_fp16_onnx_export_needs_cuda(tiny_model, tmp_path):
    with pytest.raises(InvalidRequestError, match="needs a CUDA GPU") as err:
        export_model(tiny_model, tmp_path / "out", precision="fp16")
    assert err.value.field == "precision"


def test_export_refuses_to_clobber_a_foreign_folder(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequestError) as err:
        export_model(tiny_model, tmp_path)
    assert err.value.field == "out"


def test_cli_export_bad_batch_names_the_flag(tiny_model, tmp_path, capsys):
    from serve.cli import main

    assert main(["export", "--model", tiny_model, "--out", str(tmp_path / "o"), "--batch", "4:2:1"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_backend_resolution(repo, tiny_model):
    assert resolve_backend("auto", repo, "unet", CPU, torch.float32) == "onnxruntime"
    assert resolve_backend("auto", tiny_model, "unet", CPU, torch.float32) == "torch"
    with pytest.raises(EngineError, match="exported model repository"):
        load_engine("torch", read_model_info(repo), "unet", CPU, torch.float32)
    with pytest.raises(InvalidRequestError):
        load_engine("tflite", read_model_info(repo), "unet", CPU, torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_is_a_clear_error(repo, tiny_model, tmp_path):
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        load_engine("tensorrt", read_model_info(repo), "unet", CPU, torch.float32)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        export_model(tiny_model, tmp_path / "trt", fmt="tensorrt", precision="fp16")
    assert not (tmp_path / "trt").exists()
