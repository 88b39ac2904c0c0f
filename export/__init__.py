"""Export a diffusers model into a model repository: ONNX per component, optional TensorRT engines.

``export_model(source, out)`` is the entry point (``darkroom export`` calls it). Each family
describes its components once (``Family.specs``, data types in ``serve.engines.specs``); ONNX
export, TensorRT build and the runtimes in ``serve/engines`` all read them from the repository's
manifest (written by ``export.manifest``, read by ``serve.engines.manifest``). No Ray.
"""

from export.exporter import FORMATS, PRECISIONS, component_specs, export_model
from export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    content_sha256,
    engine_filename,
    engine_key,
    file_sha256,
    is_exported_repository,
    onnx_files,
    onnx_path,
    read_manifest,
    source_hash,
    tool_versions,
)
from export.onnx_export import OPSET, TOLERANCE, export_onnx, load_component, optimize_onnx, verify_onnx
from export.tensorrt_build import build_engine, build_engines
from serve.engines.specs import PROFILE_LEVELS, ComponentSpec, Range, SizeRange, TensorSpec, parse_batch, parse_size

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "OPSET",
    "PRECISIONS",
    "PROFILE_LEVELS",
    "TOLERANCE",
    "ComponentSpec",
    "Range",
    "SizeRange",
    "TensorSpec",
    "build_engine",
    "build_engines",
    "component_specs",
    "content_sha256",
    "engine_filename",
    "engine_key",
    "export_model",
    "export_onnx",
    "file_sha256",
    "is_exported_repository",
    "load_component",
    "onnx_files",
    "onnx_path",
    "optimize_onnx",
    "parse_batch",
    "parse_size",
    "read_manifest",
    "source_hash",
    "tool_versions",
    "verify_onnx",
]
