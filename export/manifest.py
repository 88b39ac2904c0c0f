"""The exported model repository: layout, manifest, content hashes and artifact keys.

Layout of ``OUT`` (``serve.model.read_model_info(OUT)`` works on it unchanged)::

    OUT/manifest.json                  what is here, how it was made, and content keys
    OUT/model_index.json               copied from the source model
    OUT/tokenizer/  OUT/scheduler/     copied
    OUT/text_encoder/config.json       copied (read_model_info reads these configs)
    OUT/unet/config.json  OUT/vae/config.json
    OUT/<component>/model.onnx         one per component (text_encoder, unet, vae_decoder),
                                       plus model.onnx.data when the graph is over 2 GB
    OUT/<component>/engine-<key>.plan  TensorRT engines, named by their content key

Artifacts are keyed by content, never by "the file exists": an ONNX file by its sha256, a
TensorRT engine by ``engine_key(onnx sha256, profile, precision, TensorRT version, GPU arch)``.
Change any of them and the key (so the file name) changes; a stale engine is never picked up.
Nothing here imports onnx or TensorRT: the runtimes read manifests through this module.
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

from export.specs import ComponentSpec
from serve.errors import ModelLoadError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"

#: Files copied from a diffusers folder so read_model_info and the tokenizer work on OUT.
COPIED_FILES = ("model_index.json", "text_encoder/config.json", "unet/config.json", "vae/config.json")
COPIED_DIRS = ("tokenizer", "scheduler")
#: Source folders whose weights the exported components come from.
SOURCE_DIRS = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


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


def source_hash(source: str | os.PathLike[str]) -> dict[str, Any]:
    """sha256 of the source model: its exported components' weight and config files.

    ``{"sha256": <over the per-file lines>, "files": {"unet/diffusion_pytorch_model.safetensors": ...}}``
    """
    source = Path(source)
    files: dict[str, str] = {}
    for sub in sorted(set(SOURCE_DIRS.values())):
        folder = source / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"):
                files[f.relative_to(source).as_posix()] = file_sha256(f)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise ModelLoadError(f"no weight files under {source} ({', '.join(sorted(set(SOURCE_DIRS.values())))})")
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


def _canonical_profile(profile: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    return {name: [[int(d) for d in shape] for shape in shapes] for name, shapes in sorted(profile.items())}


def engine_key(
    onnx_sha256: str,
    profile: Mapping[str, Sequence[Sequence[int]]],
    precision: str,
    trt_version: str,
    gpu_arch: str,
) -> str:
    """The content key of a TensorRT engine: sha256 over everything that changes the build.

    ``profile`` is ``{input: (min, opt, max) shapes}`` (``ComponentSpec.profile``); ``gpu_arch``
    e.g. ``sm_90``. Same inputs -> same key; any change (a wider profile, fp16 instead of fp32,
    a new TensorRT) -> a different key, so a different engine file.
    """
    payload = {
        "onnx_sha256": onnx_sha256,
        "profile": _canonical_profile(profile),
        "precision": precision,
        "tensorrt": trt_version,
        "gpu_arch": gpu_arch,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_filename(key: str) -> str:
    return f"engine-{key[:32]}.plan"


def is_exported_repository(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def onnx_path(repo: Path, component: str) -> Path:
    return Path(repo) / component / ONNX_NAME


def onnx_files(repo: Path, component: str) -> list[Path]:
    """The component's ONNX file and its external data file, when there is one."""
    main = onnx_path(repo, component)
    data = main.with_name(ONNX_DATA_NAME)
    return [main, data] if data.is_file() else [main]


def copy_model_files(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Copy what read_model_info and the tokenizer read (configs, tokenizer, scheduler)."""
    source, out = Path(source), Path(out)
    for rel in COPIED_FILES:
        src = source / rel
        if not src.is_file():
            raise ModelLoadError(f"model file missing: {src}")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / rel)
    for rel in COPIED_DIRS:
        if not (source / rel).is_dir():
            raise ModelLoadError(f"model folder missing: {source / rel}")
        shutil.copytree(source / rel, out / rel, dirs_exist_ok=True)


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


def read_manifest(repo: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an exported repository; ModelLoadError when missing, unreadable or too new."""
    path = Path(repo) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{repo} is not an exported model repository (no {MANIFEST_NAME})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    return data


def component_entry(manifest: Mapping[str, Any], component: str, repo: Path | str = "") -> dict[str, Any]:
    try:
        return manifest["components"][component]
    except KeyError:
        raise ModelLoadError(f"{repo}: the manifest has no component {component!r}") from None


def component_spec(manifest: Mapping[str, Any], component: str) -> ComponentSpec:
    return ComponentSpec.from_dict(component_entry(manifest, component)["spec"])


def find_engine(manifest: Mapping[str, Any], component: str, keys: Iterable[str]) -> dict[str, Any] | None:
    """The first engine entry of ``component`` whose key is one of ``keys`` (in ``keys``' order)."""
    engines = {e["key"]: e for e in component_entry(manifest, component).get("engines", [])}
    for key in keys:
        if key in engines:
            return engines[key]
    return None


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ONNX_DATA_NAME",
    "ONNX_NAME",
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
