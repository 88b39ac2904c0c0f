"""``export_model``: a diffusers folder -> an exported model repository (ONNX, optionally TensorRT).

Steps, each logged and reported through ``progress``: read the model's configs -> specs from the
batch/size ranges -> per component: export to ONNX, optimise, verify against torch with ONNX
Runtime at the min/opt/max shapes -> write the manifest -> (``fmt="tensorrt"``) build and
verify TensorRT engines. An ONNX file whose inputs did not change (same source weights, spec,
precision, opset and tool versions, and an unmodified file) is kept rather than re-exported, so
its TensorRT engines stay valid: everything is keyed by content.

Precision: ``fmt="onnx", precision="fp16"`` exports fp16 weights and needs CUDA (the export
runs the model in fp16, which CPU torch does not do well) -- on a CPU-only machine it raises
InvalidRequestError. ``fmt="tensorrt", precision="fp16"`` exports fp32 ONNX and lets TensorRT
build fp16 engines from it (``BuilderFlag.FP16``), which works from any machine with a GPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from export.manifest import (
    FORMAT_VERSION,
    content_sha256,
    copy_model_files,
    is_exported_repository,
    onnx_files,
    onnx_path,
    read_manifest,
    source_hash,
    tool_versions,
    write_manifest,
)
from export.onnx_export import OPSET, TOLERANCE, export_onnx, verify_onnx
from serve.engines.specs import ComponentSpec, Range, SizeRange, parse_batch, parse_size
from serve.errors import DarkroomError, InvalidRequestError
from serve.families import Family, family_of
from serve.model import read_model_info, resolve_model_path

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16")

Progress = Callable[[str], None]


def _reusable(old: Mapping[str, Any] | None, new: Mapping[str, Any], component: str, repo: Path) -> bool:
    """Whether the ONNX file of a previous export is exactly what this export would write."""
    if not old:
        return False
    entry = old.get("components", {}).get(component)
    if not entry or entry.get("spec") != new["components"][component]["spec"]:
        return False
    same = all(old.get(k) == new.get(k) for k in ("precision", "opset", "optimize"))
    same = same and old.get("source", {}).get("sha256") == new["source"]["sha256"]
    tools = ("torch", "onnx", "onnxslim", "diffusers", "transformers")
    same = same and all(old.get("tools", {}).get(t) == new["tools"].get(t) for t in tools)
    if not same or not onnx_path(repo, component).is_file():
        return False
    return content_sha256(onnx_files(repo, component), repo) == entry.get("onnx", {}).get("sha256")


def _prepare_out(out: Path) -> dict[str, Any] | None:
    """Create ``out``; refuse a non-empty folder that is not a previous export (never clobber)."""
    if out.exists() and not out.is_dir():
        raise InvalidRequestError("out", str(out), "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_exported_repository(out):
        raise InvalidRequestError("out", str(out), "is not empty and holds no export; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not is_exported_repository(out):
        return None
    try:
        return read_manifest(out)
    except DarkroomError as exc:
        logger.warning("ignoring the previous manifest in %s: %s", out, exc)
        return None


def export_model(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    batch: str | tuple[int, int, int] | Range = "1:1:4",
    size: str | tuple[Any, Any, Any] | SizeRange | None = None,
    opset: int = OPSET,
    optimize: bool = True,
    device: str | None = None,
    progress: Progress | None = None,
    family: str | None = None,
) -> Path:
    """Export ``source`` (a diffusers folder) into the model repository ``out_dir``; returns its path.

    ``batch`` counts images per engine call as MIN:OPT:MAX (the text encoder and UNet profiles
    double it for classifier-free guidance); ``size`` is image side pixels MIN:OPT:MAX, each
    ``S`` or ``WxH`` (default: native/2 : native : 2 x native). Raises InvalidRequestError for a
    bad argument and EngineError when an exported component does not match torch.
    """
    say = _reporter(progress)
    if fmt not in FORMATS:
        raise InvalidRequestError("format", fmt, f"choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise InvalidRequestError("precision", precision, f"choose one of {', '.join(PRECISIONS)}")
    b, s = parse_batch(batch), (parse_size(size) if size is not None else None)
    src = resolve_model_path(source)
    if is_exported_repository(src):
        raise InvalidRequestError("model", str(source), "is an exported repository; export from a diffusers folder")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if fmt == "tensorrt":  # fail before minutes of ONNX export, not after
        from serve.engines.tensorrt_backend import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda(dev)
    # TensorRT builds fp16 engines from fp32 ONNX; only an fp16 *ONNX* export runs torch in fp16.
    onnx_precision = precision if fmt == "onnx" else "fp32"
    if onnx_precision == "fp16" and dev.type != "cuda":
        raise InvalidRequestError(
            "precision",
            precision,
            "fp16 ONNX export needs a CUDA GPU; export fp32 ONNX here, or use --format tensorrt "
            "--precision fp16 on a GPU machine (fp16 engines from fp32 ONNX)",
        )
    info = read_model_info(src, family)
    fam = family_of(info)
    specs = component_specs(fam, b, s, onnx_precision)
    out = Path(out_dir).expanduser().resolve()
    old = _prepare_out(out)
    say(f"exporting {src} -> {out} ({fmt}, {precision}, batch {b}, size {s or 'default'})")
    t0 = time.perf_counter()
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": info.name,
        "family": info.family,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(src), **source_hash(src, [fam.folder(c) for c in fam.components])},
        "precision": onnx_precision,
        "opset": opset,
        "optimize": optimize,
        "profile_args": {"batch": str(b), "size": _size_of(specs)},
        "tools": tool_versions(),
        "components": {name: {"spec": spec.to_dict()} for name, spec in specs.items()},
    }
    copy_model_files(src, out)
    dtype = torch.float16 if onnx_precision == "fp16" else torch.float32
    providers = _verify_providers(dev)
    for name, spec in specs.items():
        entry = manifest["components"][name]
        if _reusable(old, manifest, name, out):
            prev = old["components"][name]  # type: ignore[index]
            entry.update(onnx=prev["onnx"], verify=prev.get("verify", {}), engines=prev.get("engines", []))
            say(f"{name}: unchanged since the last export ({prev['onnx']['sha256'][:12]}), kept")
            continue
        entry.update(_export_component(fam, out, name, spec, dtype, dev, opset, optimize, providers, say))
        entry["engines"] = []
    write_manifest(out, manifest)
    say(f"ONNX export done in {time.perf_counter() - t0:.1f} s: {out}")
    if fmt == "tensorrt":
        from export.tensorrt_build import build_engines

        build_engines(out, precision=precision, source=src, device=str(dev), progress=progress)
    return out


def _export_component(
    fam: Family,
    out: Path,
    name: str,
    spec: ComponentSpec,
    dtype: torch.dtype,
    dev: torch.device,
    opset: int,
    optimize: bool,
    providers: list[str],
    say: Progress,
) -> dict[str, Any]:
    t = time.perf_counter()
    say(f"{name}: loading torch module")
    module = fam.module(name, dtype).to(dev).eval()
    say(f"{name}: exporting to ONNX (opset {opset})")
    path = onnx_path(out, name)
    files, optimizer = export_onnx(module, spec, path, opset=opset, optimize=optimize)
    say(f"{name}: optimised with {optimizer}" if optimizer else f"{name}: graph not optimised")
    say(f"{name}: verifying against torch at min/opt/max shapes ({', '.join(providers)})")
    precision = "fp16" if dtype == torch.float16 else "fp32"
    errors = verify_onnx(module, spec, path, precision=precision, providers=providers)
    worst = max(errors.values())
    say(
        f"{name}: max abs error {worst:.3g} vs torch "
        f"({', '.join(f'{k} {v:.2g}' for k, v in errors.items())}) in {time.perf_counter() - t:.1f} s"
    )
    del module
    return {
        "onnx": {
            "files": [f.relative_to(out).as_posix() for f in files],
            "sha256": content_sha256(files, out),
            "bytes": sum(f.stat().st_size for f in files),
            "optimizer": optimizer,
        },
        "verify": {
            "onnxruntime": {
                "max_abs_error": errors,
                "tolerance": TOLERANCE[precision],
                "providers": providers,
            }
        },
    }


def component_specs(
    family: Family, batch: Range | str = "1:1:4", size: SizeRange | str | None = None, precision: str = "fp32"
) -> dict[str, ComponentSpec]:
    """Every component's spec; ``size`` defaults to native/2 : native : 2 x native."""
    return family.specs(
        parse_batch(batch), parse_size(size) if size is not None else family.default_size_range(), precision
    )


def _size_of(specs: Mapping[str, ComponentSpec]) -> str:
    """The pixel size range the specs cover, e.g. ``32x32:64x64:128x128``."""
    vae = specs["vae_decoder"]
    factor = dict((n, f) for n, _, f in vae.derived)["image_height"]
    h, w = vae.dim_range("latent_height"), vae.dim_range("latent_width")
    return ":".join(f"{w.at(k) * factor}x{h.at(k) * factor}" for k in ("min", "opt", "max"))


def _verify_providers(dev: torch.device) -> list[str]:
    """ONNX Runtime providers for verification: CUDA for GPU exports when present, else CPU."""
    import onnxruntime as ort

    if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _reporter(progress: Progress | None) -> Progress:
    def say(message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(message)

    return say


__all__ = ["FORMATS", "PRECISIONS", "component_specs", "export_model"]
