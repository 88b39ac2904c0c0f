"""The native TensorRT backend: engines built by ``export/tensorrt_build.py`` (TensorRT 10 API).

Tensors are bound by address to torch CUDA tensors (``set_tensor_address``), shapes are set per
call (``set_input_shape``), and ``execute_async_v3`` runs on torch's current CUDA stream, so no
copies happen at the edge and torch's stream ordering covers the engine's reads and writes.

Which engine file: the manifest lists engines by content key; this backend computes the key it
needs here -- ``engine_key(ONNX sha256, profile, precision, TensorRT version, GPU arch)`` -- and
loads only that one. An engine built for another GPU, TensorRT or profile is never picked up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from serve.engines.base import Engine
from serve.errors import DarkroomError, EngineError

logger = logging.getLogger(__name__)


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or EngineError saying how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the package is there, libnvinfer is not
        raise EngineError(
            "TensorRT is not installed: install `tensorrt` (10.x, the darkroom[gpu] extra) on a CUDA "
            f"machine, or use the onnxruntime backend ({exc})"
        ) from exc
    return tensorrt


def require_cuda(device: torch.device) -> torch.device:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineError(f"TensorRT engines run on a CUDA GPU; device {device} is not one (or CUDA is missing)")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def gpu_arch(device: torch.device) -> str:
    """The GPU's compute capability as TensorRT engines depend on it, e.g. ``sm_90`` for an H100."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def torch_dtype(trt: Any, trt_dtype: Any) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "int64": torch.int64,
        "int8": torch.int8,
        "bool": torch.bool,
    }
    for name, dtype in table.items():
        if hasattr(trt, name) and trt_dtype == getattr(trt, name):
            return dtype
    raise EngineError(f"unsupported TensorRT tensor type {trt_dtype}")


class TensorRTRunner:
    """One deserialised engine and execution context; ``run`` binds torch CUDA tensors by address."""

    def __init__(self, plan: Path, device: torch.device) -> None:
        trt = require_tensorrt()
        self.device = require_cuda(device)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self._trt_logger)
            try:
                data = Path(plan).read_bytes()
            except OSError as exc:
                raise EngineError(f"cannot read TensorRT engine {plan}: {exc}") from exc
            self.engine = self.runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise EngineError(f"TensorRT could not deserialise {plan} (built by another TensorRT or GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        # (min, opt, max) of optimisation profile 0, for a readable error before TensorRT's own.
        self.profile = {
            n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, 0)) for n in self.inputs
        }
        self._lock = threading.Lock()  # one execution context: one call at a time

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=False)):
            raise EngineError(f"{name} shape {shape} is outside the engine's profile {lo}..{hi}; re-export wider")

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock, torch.cuda.device(self.device):
            bound = []  # keep inputs alive until the engine has been enqueued
            for name in self.inputs:
                if name not in inputs:
                    raise EngineError(f"missing input {name!r}; expected {self.inputs}")
                x = inputs[name].to(self.device, self.dtypes[name]).contiguous()
                shape = tuple(x.shape)
                self._check_profile(name, shape)
                if not self.context.set_input_shape(name, shape):
                    raise EngineError(f"TensorRT rejected shape {shape} for {name}")
                self.context.set_tensor_address(name, x.data_ptr())
                bound.append(x)
            outputs = {}
            for name in self.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"TensorRT could not infer the shape of {name} ({shape})")
                y = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, y.data_ptr())
                outputs[name] = y
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            return outputs


def engine_candidates(model_path: Path, component: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Engine keys this machine can run for ``component``, preferred first (fp16 first for fp16)."""
    from serve.engines.manifest import component_entry, component_spec, engine_key, read_manifest

    trt = require_tensorrt()
    dev = require_cuda(device)
    manifest = read_manifest(model_path)
    entry = component_entry(manifest, component, model_path)
    spec = component_spec(manifest, component)
    order = ("fp16", "fp32") if dtype == torch.float16 else ("fp32", "fp16")
    arch = gpu_arch(dev)
    return [engine_key(entry["onnx"]["sha256"], spec.profile, p, trt.__version__, arch) for p in order]


def find_engine_file(model_path: Path, component: str, device: torch.device, dtype: torch.dtype) -> Path | None:
    """The engine file this machine should load, or None (no TensorRT, no CUDA, none built)."""
    from serve.engines.manifest import find_engine, read_manifest

    try:
        keys = engine_candidates(model_path, component, device, dtype)
        found = find_engine(read_manifest(model_path), component, keys)
    except DarkroomError:
        return None
    if found is None or not (Path(model_path) / found["file"]).is_file():
        return None
    return Path(model_path) / found["file"]


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def load(self) -> None:
        from serve.engines.manifest import component_spec, read_manifest

        require_tensorrt()
        self.device = require_cuda(self.device)
        plan = find_engine_file(self.model_path, self.component, self.device, self.dtype)
        if plan is None:
            arch = gpu_arch(self.device)
            raise EngineError(
                f"no TensorRT engine for {self.component} in {self.model_path} built for {arch} with this "
                "TensorRT and profile; build one with `darkroom export --format tensorrt --out "
                f"{self.model_path} --model <diffusers folder>`"
            )
        self.spec = component_spec(read_manifest(self.model_path), self.component)
        self.runner = TensorRTRunner(plan, self.device)
        out_dtype = self.runner.dtypes[self.spec.output_names[0]]
        if out_dtype != self.dtype:
            logger.info(
                "%s: engine I/O is %s (asked %s); stages use the engine's",
                self.component,
                out_dtype,
                self.dtype,
            )
        self.dtype = out_dtype
        first = self.spec.input_names[0]
        self.max_batch_samples = self.runner.profile[first][2][0]  # profile max of the batch axis
        self.warmup()
        logger.info("loaded TensorRT %s from %s on %s", self.component, plan, self.device)

    def warmup(self) -> None:
        """Run every profile level once: the first call at a new shape is slow (TensorRT #4289)."""
        from serve.engines.specs import random_inputs

        for level in ("min", "opt", "max"):
            # vocab=1: token ids 0, always inside the embedding table
            self.runner.run(random_inputs(self.spec, self.spec.shapes(level), vocab=1, device=self.device))
        torch.cuda.synchronize(self.device)

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runner.run(inputs)

    def shutdown(self) -> None:
        self.runner = None  # type: ignore[assignment]
        torch.cuda.empty_cache()


__all__ = ["TensorRTEngine", "TensorRTRunner", "find_engine_file", "gpu_arch", "require_tensorrt"]
