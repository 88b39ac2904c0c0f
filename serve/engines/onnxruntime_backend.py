"""The ONNX Runtime backend: ``<repo>/<component>/model.onnx`` from ``darkroom export``.

Execution providers by availability: TensorRT, then CUDA (both only for a CUDA ``device``), then
CPU. On CUDA, inputs and outputs are bound to torch CUDA tensors (I/O binding: no host copies);
on CPU, tensors are converted to numpy at the edge (zero-copy for contiguous CPU tensors).

The engine's ``dtype`` is the graph's float type (what the manifest's spec says), whatever the
caller asked: an fp32 export runs in fp32 on a GPU too, and the stages, which read
``engine.dtype``, then prepare latents in fp32 -- as the seed contract wants.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from serve.engines.base import Engine
from serve.errors import DarkroomError, EngineError

if TYPE_CHECKING:
    from serve.model import ModelInfo

logger = logging.getLogger(__name__)

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def _shape_list(shapes: dict[str, tuple[int, ...]]) -> str:
    """TensorRT EP profile syntax: ``sample:1x4x8x8,timestep:1``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        info: ModelInfo,
        component: str,
        device: torch.device,
        dtype: torch.dtype,
        *,
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(info, component, device, dtype)
        self.requested_providers = list(providers) if providers else None

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"onnxruntime is not installed (pip install onnxruntime): {exc}") from exc
        from serve.engines.manifest import component_entry, component_spec, onnx_path, read_manifest

        try:
            manifest = read_manifest(self.model_path)
            self.entry = component_entry(manifest, self.component, self.model_path)
            self.spec = component_spec(manifest, self.component)
        except DarkroomError as exc:
            raise EngineError(f"cannot load {self.component} with onnxruntime: {exc.message}") from exc
        path = onnx_path(self.model_path, self.component)
        if not path.is_file():
            raise EngineError(f"{path} is missing; re-run darkroom export")
        self.session = self._create_session(ort, path)
        self.providers = self.session.get_providers()
        if self.providers[0] == "TensorrtExecutionProvider":  # its engines hold the export profile
            self.max_batch_samples = self.spec.shapes("max")[self.spec.input_names[0]][0]
        on_gpu = self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        if self.device.type == "cuda" and not on_gpu:
            logger.warning("%s: no CUDA provider in onnxruntime; running on CPU", self.component)
        self.io_binding = self.device.type == "cuda" and on_gpu
        out_dtype = _TORCH[self.spec.outputs[0].dtype]
        if out_dtype != self.dtype:
            logger.info("%s: graph is %s (asked %s); stages use the graph's", self.component, out_dtype, self.dtype)
        self.dtype = out_dtype
        logger.info("loaded %s from %s with %s", self.component, path, self.providers)

    def _provider_chain(self, ort: Any) -> list[list[Any]]:
        """Provider lists to try in order, each falling back to the next when it fails to start."""
        if self.requested_providers:
            return [self.requested_providers]
        cpu: list[Any] = ["CPUExecutionProvider"]
        if self.device.type != "cuda":
            return [cpu]
        available = set(ort.get_available_providers())
        index = self.device.index if self.device.index is not None else 0
        cuda = ("CUDAExecutionProvider", {"device_id": index})
        chains = []
        if "TensorrtExecutionProvider" in available and "CUDAExecutionProvider" in available:
            chains.append([("TensorrtExecutionProvider", self._trt_options(index)), cuda, *cpu])
        if "CUDAExecutionProvider" in available:
            chains.append([cuda, *cpu])
        return [*chains, cpu]

    def _trt_options(self, index: int) -> dict[str, Any]:
        """ORT's TensorRT EP: the export profile, fp16 when asked, engines cached per ONNX sha256."""
        from serve.settings import Settings

        cache = Settings.from_env().cache_dir / "ort-trt" / self.entry["onnx"]["sha256"][:16]
        cache.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": index,
            "trt_fp16_enable": self.dtype == torch.float16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": _shape_list(self.spec.shapes("min")),
            "trt_profile_opt_shapes": _shape_list(self.spec.shapes("opt")),
            "trt_profile_max_shapes": _shape_list(self.spec.shapes("max")),
        }

    def _create_session(self, ort: Any, path: Path) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Three sessions (and torch) share the cores of one process, one call at a time: worker
        # threads that keep spinning after a call only steal CPU from the next stage's call.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chains = self._provider_chain(ort)
        for i, providers in enumerate(chains):
            try:
                return ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # a provider whose libraries are missing fails here
                if i == len(chains) - 1:
                    raise EngineError(f"onnxruntime cannot load {path}: {exc}") from exc
                logger.warning("%s: providers %s failed (%s); trying the next", self.component, providers, exc)
        raise EngineError(f"onnxruntime cannot load {path}")  # unreachable: chains is never empty

    def _inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.spec.input_names if inputs.get(n) is None]
        if missing:
            raise EngineError(f"{self.component}: missing inputs {missing}; expected {self.spec.input_names}")
        return {t.name: inputs[t.name].detach() for t in self.spec.inputs}

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = self._inputs(inputs)
        try:
            if self.io_binding:
                return self._run_bound(feed)
            arrays = {t.name: feed[t.name].to("cpu", _TORCH[t.dtype]).contiguous().numpy() for t in self.spec.inputs}
            outs = self.session.run(self.spec.output_names, arrays)
        except DarkroomError:
            raise
        except Exception as exc:  # onnxruntime's own error types (Fail, InvalidArgument, ...)
            shapes = {k: tuple(v.shape) for k, v in feed.items()}
            raise EngineError(f"{self.component}: onnxruntime failed on {shapes}: {exc}") from exc
        return {
            name: torch.from_numpy(np.ascontiguousarray(out)).to(self.device)
            for name, out in zip(self.spec.output_names, outs, strict=True)
        }

    def _run_bound(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind torch CUDA tensors by pointer; outputs are preallocated from the spec's shapes."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        bound = {}
        for t in self.spec.inputs:
            x = feed[t.name].to(self.device, _TORCH[t.dtype]).contiguous()
            bound[t.name] = x
            binding.bind_input(t.name, "cuda", index, np.dtype(t.dtype), tuple(x.shape), x.data_ptr())
        shapes = self.spec.output_shapes({k: tuple(v.shape) for k, v in bound.items()})
        outputs = {}
        for out_spec in self.spec.outputs:
            y = torch.empty(shapes[out_spec.name], dtype=_TORCH[out_spec.dtype], device=self.device)
            binding.bind_output(out_spec.name, "cuda", index, np.dtype(out_spec.dtype), tuple(y.shape), y.data_ptr())
            outputs[out_spec.name] = y
        # ORT runs on its own CUDA stream: the inputs torch just wrote must be complete first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return outputs

    def shutdown(self) -> None:
        self.session = None


__all__ = ["OnnxRuntimeEngine"]
