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

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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


def _check_out(out: Path) -> dict[str, Any] | None:
    """Refuse an ``out`` that must not be replaced (never clobber); the previous export's
    manifest when ``out`` holds one (its unchanged ONNX files are reused)."""
    if out.exists() and not out.is_dir():
        raise InvalidRequestError("out", str(out), "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_exported_repository(out):
        raise InvalidRequestError("out", str(out), "is not empty and holds no export; choose an empty folder")
    if not is_exported_repository(out):
        return None
    try:
        return read_manifest(out)
    except DarkroomError as exc:
        logger.warning("ignoring the previous manifest in %s: %s", out, exc)
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove staging folders of ``out`` left by runs that were killed (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.export-*"):
        pid = path.name[len(f".{out.name}.export-") :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new folder next to ``out`` that the export writes into and that becomes ``out`` only
    when everything succeeded (renamed into place; a previous export there is replaced).

    A failed or interrupted export deletes it and leaves ``out`` as it was (absent, or the
    previous export), so a retry starts clean; a folder left by a killed run is removed by the
    next one. Next to ``out`` (not in /tmp) so the final rename stays on one file system.
    """
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    work = out.parent / f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
        if out.exists():
            previous = out.parent / f".{out.name}.export-{os.getpid()}-previous"
            os.replace(out, previous)
            os.replace(work, out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in missing:  # parents this run created, innermost first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no second copy of a GB-sized engine; nothing writes to these again
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old_repo: Path, new_repo: Path, component: str, entry: Mapping[str, Any]) -> None:
    """Bring a reused component's files (ONNX, TensorRT engines) from the previous export."""
    files = [f.relative_to(old_repo) for f in onnx_files(old_repo, component)]
    files += [Path(e["file"]) for e in entry.get("engines", []) if e.get("file")]
    for rel in files:
        if (old_repo / rel).is_file():
            _link_or_copy(old_repo / rel, new_repo / rel)
    for cache in old_repo.glob("timing-cache-*.cache"):  # TensorRT rewrites these: copy
        if not (new_repo / cache.name).exists():
            shutil.copy2(cache, new_repo / cache.name)


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

    Everything is written into a folder next to ``out_dir`` that replaces it only when the
    export succeeded: a failed run leaves ``out_dir`` as it was (absent, or the last export).
    """
    out = Path(out_dir).expanduser().resolve()
    old = _check_out(out)
    options = dict(fmt=fmt, precision=precision, batch=batch, size=size, opset=opset, optimize=optimize)
    with _staged(out) as work:
        _export(source, out, work, old, device=device, progress=progress, family=family, **options)
    return out


def _export(
    source: str | os.PathLike[str],
    out: Path,
    work: Path,
    old: dict[str, Any] | None,
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
) -> None:
    """``export_model``'s work: the repository for ``out`` written into ``work``; ``old`` is the
    previous export's manifest, whose unchanged components are carried over."""
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
    copy_model_files(src, work)
    dtype = torch.float16 if onnx_precision == "fp16" else torch.float32
    providers = _verify_providers(dev)
    for name, spec in specs.items():
        entry = manifest["components"][name]
        if _reusable(old, manifest, name, out):
            prev = old["components"][name]  # type: ignore[index]
            _carry_over(out, work, name, prev)
            entry.update(onnx=prev["onnx"], verify=prev.get("verify", {}), engines=prev.get("engines", []))
            say(f"{name}: unchanged since the last export ({prev['onnx']['sha256'][:12]}), kept")
            continue
        entry.update(_export_component(fam, work, name, spec, dtype, dev, opset, optimize, providers, say))
        entry["engines"] = []
    write_manifest(work, manifest)
    say(f"ONNX export done in {time.perf_counter() - t0:.1f} s: {out}")
    if fmt == "tensorrt":
        from export.tensorrt_build import build_engines

        build_engines(work, precision=precision, source=src, device=str(dev), progress=progress)


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
    """Each progress message once: to ``progress`` when given (the CLI prints it), else the log."""
    if progress is not None:
        return progress
    return lambda message: logger.info("%s", message)


__all__ = ["FORMATS", "PRECISIONS", "component_specs", "export_model"]
