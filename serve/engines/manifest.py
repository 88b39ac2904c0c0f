"""Reading an exported model repository: its manifest, component specs, ONNX paths, engine keys.

Layout of a repository ``OUT`` (``darkroom export`` writes it, see ``export/``)::

    OUT/manifest.json                  what is here, how it was made, and content keys
    OUT/model_index.json               copied from the source model (names the family)
    OUT/<component folder>/config.json copied (read_model_info reads these configs)
    OUT/tokenizer*/  OUT/scheduler/    copied
    OUT/<component>/model.onnx         one per component (e.g. text_encoder, unet, vae_decoder),
                                       plus model.onnx.data when the graph is over 2 GB
    OUT/<component>/engine-<key>.plan  TensorRT engines, named by their content key

Artifacts are keyed by content, never by "the file exists": an ONNX file by its sha256, a
TensorRT engine by ``engine_key(onnx sha256, profile, precision, TensorRT version, GPU arch)``.
This is the runtime's side (the engines read manifests through it); ``export.manifest`` writes
them. Nothing here imports onnx or TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from serve.engines.specs import ComponentSpec
from serve.errors import ModelLoadError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"


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
    "engine_filename",
    "engine_key",
    "find_engine",
    "is_exported_repository",
    "onnx_files",
    "onnx_path",
    "read_manifest",
]
