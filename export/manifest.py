"""Writing an exported model repository: content hashes, tool versions, copied configs, the manifest.

The layout and the reading side (manifest, specs, ONNX paths, engine keys) live in
``serve.engines.manifest``, because the runtimes read repositories and the runtime never imports
the export toolchain; this module re-exports them so export code has one place to import from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from serve.engines.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ONNX_DATA_NAME,
    ONNX_NAME,
    component_entry,
    component_spec,
    engine_filename,
    engine_key,
    find_engine,
    is_exported_repository,
    onnx_files,
    onnx_path,
    read_manifest,
)
from serve.errors import ModelLoadError

#: Files that hold weights: never copied into a repository (its components are ONNX / engines).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".plan", ".data")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(files: Sequence[Path], root: Path) -> str:
    """One file: its sha256. Several (ONNX + external data): sha256 of ``relpath sha256`` lines."""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = sorted(f"{f.relative_to(root).as_posix()} {file_sha256(f)}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def source_hash(source: str | os.PathLike[str], subfolders: Iterable[str]) -> dict[str, Any]:
    """sha256 of the source model: the weight and config files of the exported components' folders.

    ``{"sha256": <over the per-file lines>, "files": {"unet/diffusion_pytorch_model.safetensors": ...}}``
    """
    source = Path(source)
    folders = sorted(set(subfolders))
    files: dict[str, str] = {}
    for sub in folders:
        folder = source / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"):
                files[f.relative_to(source).as_posix()] = file_sha256(f)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise ModelLoadError(f"no weight files under {source} ({', '.join(folders)})")
    lines = "".join(f"{name} {digest}\n" for name, digest in files.items())
    return {"sha256": hashlib.sha256(lines.encode()).hexdigest(), "files": files}


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def tool_versions() -> dict[str, str | None]:
    """Versions of everything that shapes an artifact (None: not installed)."""
    return {
        "torch": _dist_version("torch"),
        "onnx": _dist_version("onnx"),
        "onnxruntime": _dist_version("onnxruntime", "onnxruntime-gpu"),
        "onnxslim": _dist_version("onnxslim"),
        "diffusers": _dist_version("diffusers"),
        "transformers": _dist_version("transformers"),
        "tensorrt": _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    }


def copy_model_files(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Copy everything but weights: ``model_index.json``, every config, tokenizers, the scheduler.

    ``read_model_info`` and the tokenizers then work on ``out`` as on the source, for every family.
    """
    source, out = Path(source), Path(out)
    if not (source / "model_index.json").is_file():
        raise ModelLoadError(f"model file missing: {source / 'model_index.json'}")
    for src in sorted(source.rglob("*")):
        rel = src.relative_to(source)
        if not src.is_file() or src.suffix in WEIGHT_SUFFIXES or any(p.startswith(".") for p in rel.parts):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / rel)


def write_manifest(out: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``OUT/manifest.json`` atomically (written last: its presence means "complete")."""
    path = Path(out) / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=out)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ONNX_DATA_NAME",
    "ONNX_NAME",
    "WEIGHT_SUFFIXES",
    "component_entry",
    "component_spec",
    "content_sha256",
    "copy_model_files",
    "engine_filename",
    "engine_key",
    "file_sha256",
    "find_engine",
    "is_exported_repository",
    "onnx_files",
    "onnx_path",
    "read_manifest",
    "source_hash",
    "tool_versions",
    "write_manifest",
]
