"""Export each component to ONNX, optimise the graph, and verify it against torch.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) with
``dynamic_axes`` from the spec. On this stack it exports the tiny UNet in under a second and
matches torch to ~1e-6; the dynamo exporter took ~30 s and rejected the same dynamic shapes.

One trap of a traced export: Python branches on shapes are frozen at trace time. diffusers'
UNet passes explicit ``upsample_size``s only when the latent side is not a multiple of its
up-sampling factor (8 for SD: a 520 px image = 65 latents). Traced at an aligned size, the graph
would upsample by a fixed 2x and fail at Concat for 65; so the UNet is traced at an odd latent
size, which records the skip connections' sizes as shape ops, and the graph then serves every
size (aligned sizes give the same numbers: both paths are nearest-neighbour 2x).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.engines.manifest import ONNX_DATA_NAME
from serve.engines.specs import PROFILE_LEVELS, ComponentSpec, random_inputs
from serve.errors import EngineError

logger = logging.getLogger(__name__)

OPSET = 17
#: Verification tolerance: max abs error <= TOLERANCE * max(1, max |torch output|).
#: fp32 graphs match torch to ~1e-6 here; fp16 graphs to ~1e-3..1e-2.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
#: Protobuf's hard 2 GB limit: bigger graphs keep their weights in ``model.onnx.data``.
EXTERNAL_DATA_BYTES = 1_800_000_000


def load_component(
    source: Path | str,
    component: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    family: str | None = None,
) -> torch.nn.Module:
    """A component of a diffusers folder, wrapped with its spec's I/O names (the family's wrapper), in eval mode."""
    from serve.families import family_of
    from serve.model import read_model_info

    family = family_of(read_model_info(source, family))
    if component not in family.components:
        raise EngineError(f"unknown component {component!r}; {family.name} models have {family.components}")
    return family.module(component, dtype).to(device).eval()


def vocab_size(module: torch.nn.Module) -> int:
    config = getattr(getattr(module, "model", None), "config", None)
    return int(getattr(config, "vocab_size", 1000))


@contextlib.contextmanager
def traceable_ops() -> Iterator[None]:
    """Two of Flux's ops as traceable equivalents, for the trace alone.

    - ``torch.nn.RMSNorm`` (the attention q/k norms): the TorchScript exporter has no symbolic for
      ``aten::rms_norm`` at opset 17; the same math in pow/mean/rsqrt/mul exports everywhere.
    - diffusers' ``apply_rotary_emb`` reshapes with ``x.reshape(*x.shape[:-1], -1, 2)``, which the
      tracer records with the trace's batch and sequence length baked in (a graph traced at batch 2
      then fails at batch 1); ``unflatten(-1, (-1, 2))`` is the same view with the sizes left dynamic.

    Only functions are swapped, and only while tracing: the modules keep their own code, so
    ``verify_onnx`` checks the graph against the real implementation at every profile level.
    """
    from diffusers.models.transformers import transformer_flux

    norm_forward = torch.nn.RMSNorm.forward
    rope = transformer_flux.apply_rotary_emb

    def rms_norm(self: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        dims = tuple(range(-len(self.normalized_shape), 0))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y

    def rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if not use_real or use_real_unbind_dim != -1 or sequence_dim not in (1, 2):
            return rope(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = freqs_cis
        index = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (None, slice(None), None, slice(None))
        cos, sin = cos[index].to(x.device), sin[index].to(x.device)
        x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

    torch.nn.RMSNorm.forward = rms_norm  # type: ignore[method-assign]
    transformer_flux.apply_rotary_emb = rotary
    try:
        yield
    finally:
        torch.nn.RMSNorm.forward = norm_forward  # type: ignore[method-assign]
        transformer_flux.apply_rotary_emb = rope


def trace_shapes(spec: ComponentSpec) -> dict[str, tuple[int, ...]]:
    """Opt shapes, with odd latent sides for the UNet (see the module docstring)."""
    dims = spec.dims_at("opt")
    if spec.component == "unet":
        dims = {k: (v | 1 if k.startswith("latent_") else v) for k, v in dims.items()}
    return {t.name: t.resolve(dims) for t in spec.inputs}


def _initializer_bytes(model: Any) -> int:
    return sum(len(t.raw_data) or int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def save_onnx(model: Any, path: Path) -> list[Path]:
    """Save ``model`` as ``path`` (+ ``model.onnx.data`` over 2 GB); returns the files written."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(ONNX_DATA_NAME)):
        stale.unlink(missing_ok=True)
    if _initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=ONNX_DATA_NAME
        )
    else:
        onnx.save_model(model, str(path))
    data = path.with_name(ONNX_DATA_NAME)
    return [path, data] if data.is_file() else [path]


def optimize_onnx(model: Any) -> tuple[Any, str | None]:
    """Fold constants and fuse patterns with onnxslim when it is installed; else the graph as is.

    The result stays plain ONNX (no ONNX Runtime contrib ops), so TensorRT can parse it too.
    Returns ``(model, "onnxslim <version>")`` or ``(model, None)`` when not optimised.
    """
    try:
        import onnxslim
    except ImportError:
        logger.info("onnxslim is not installed; keeping the exported graph as is")
        return model, None
    try:
        slim = onnxslim.slim(model)
    except Exception as exc:  # an optimiser bug must not cost the export: the graph is still valid
        logger.warning("onnxslim failed (%s); keeping the exported graph as is", exc)
        return model, None
    return slim, f"onnxslim {getattr(onnxslim, '__version__', '?')}"


def export_onnx(
    module: torch.nn.Module,
    spec: ComponentSpec,
    path: Path,
    *,
    opset: int = OPSET,
    optimize: bool = True,
) -> tuple[list[Path], str | None]:
    """Export ``module`` to ``path`` with the spec's names and dynamic axes; optionally optimise.

    Returns the files written and the optimiser used (None when none ran).
    """
    import onnx

    device = next(module.parameters()).device
    example = random_inputs(spec, trace_shapes(spec), vocab=vocab_size(module), device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"  # big graphs spill their weights beside it
        with warnings.catch_warnings(), torch.no_grad(), traceable_ops():
            warnings.simplefilter("ignore")  # TracerWarnings about shape branches; see module docstring
            torch.onnx.export(
                module,
                tuple(example[n] for n in spec.input_names),
                str(raw),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(raw))
        optimizer = None
        if optimize:
            model, optimizer = optimize_onnx(model)
        files = save_onnx(model, path)
    return files, optimizer


def ort_session(path: Path, providers: Sequence[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """Max |reference - actual|; inf for a shape mismatch or any NaN/inf (never silently 0)."""
    if reference.shape != actual.shape:
        return float("inf")
    err = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    return float(err.max()) if np.isfinite(err).all() else float("inf")


def check_error(component: str, level: str, shapes: Mapping[str, Any], err: float, scale: float, tol: float) -> None:
    """Raise EngineError when ``err`` exceeds ``tol`` relative to the output scale."""
    limit = tol * max(1.0, scale)
    if not err <= limit:
        raise EngineError(
            f"{component}: exported output differs from torch by {err:.3g} at {level} shapes "
            f"{dict(shapes)} (limit {limit:.3g} = {tol:g} x output scale {scale:.3g})"
        )


def verify_onnx(
    module: torch.nn.Module,
    spec: ComponentSpec,
    path: Path,
    *,
    precision: str = "fp32",
    levels: Sequence[str] = PROFILE_LEVELS,
    providers: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """ONNX Runtime vs torch on random inputs at each profile level; ``{level: max abs error}``.

    Raises EngineError for an error beyond ``TOLERANCE[precision]`` x output scale.
    """
    session = ort_session(path, providers)
    device = next(module.parameters()).device
    errors: dict[str, float] = {}
    for i, level in enumerate(levels):
        shapes = spec.shapes(level)
        inputs = random_inputs(spec, shapes, seed=seed + i, vocab=vocab_size(module), device=device)
        with torch.no_grad():
            references = [r.float().cpu().numpy() for r in module(**inputs)]
        feed = {name: x.cpu().numpy() for name, x in inputs.items()}
        actuals = session.run(spec.output_names, feed)
        # Each output against its own scale; the level reports the output worst off for its limit.
        measured = []
        for reference, actual in zip(references, actuals, strict=True):
            err = max_abs_error(reference, actual.astype(np.float32))
            measured.append((err, float(np.abs(reference).max()) if reference.size else 0.0))
        worst, worst_scale = max(measured, key=lambda m: m[0] / max(1.0, m[1]))
        errors[level] = worst
        logger.info(
            "%s %s %s: max abs error %.3g (output scale %.3g)", spec.component, level, shapes, worst, worst_scale
        )
        check_error(spec.component, level, shapes, worst, worst_scale, TOLERANCE[precision])
    return errors


def remove_component_files(folder: Path) -> None:
    """Drop a component's previous ONNX files (engines stay: they are keyed by content)."""
    for name in ("model.onnx", ONNX_DATA_NAME):
        (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob(".export-*"):
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "OPSET",
    "TOLERANCE",
    "check_error",
    "export_onnx",
    "load_component",
    "max_abs_error",
    "optimize_onnx",
    "ort_session",
    "random_inputs",
    "save_onnx",
    "verify_onnx",
]
