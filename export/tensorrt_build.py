"""Build TensorRT engines from an exported repository's ONNX files and specs (TensorRT 10 API).

Per component: parse ``<component>/model.onnx`` -> one optimisation profile from the spec's
min/opt/max shapes -> FP16 flag for ``precision="fp16"`` -> build with a persistent timing cache
(per TensorRT version and GPU arch) and a progress monitor -> write
``<component>/engine-<key>.plan`` -> verify against torch at the min/opt/max shapes (dynamic
shape engines have produced NaN/black images, TensorRT #2943) -> record it in the manifest.

The file name is the content key (``export.manifest.engine_key``): an engine whose key is in the
manifest and whose bytes still hash to the recorded sha256 is reused; anything else is built.
Refit stays off (refit-enabled engines ran ~2x slower, TensorRT #2936).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.manifest import (
    component_entry,
    component_spec,
    engine_filename,
    engine_key,
    file_sha256,
    find_engine,
    onnx_path,
    read_manifest,
    write_manifest,
)
from export.onnx_export import TOLERANCE, check_error, load_component, max_abs_error, vocab_size
from serve.engines.specs import PROFILE_LEVELS, ComponentSpec, random_inputs
from serve.engines.tensorrt_backend import TensorRTRunner, gpu_arch, require_cuda, require_tensorrt
from serve.errors import EngineError, InvalidRequestError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress_monitor(trt: Any, say: Progress) -> Any | None:
    """A TensorRT IProgressMonitor that reports top-level build phases (None before TRT 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from several threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    say(f"  tensorrt: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def build_engine(
    onnx_file: Path,
    spec: ComponentSpec,
    plan: Path,
    *,
    precision: str,
    timing_cache: Path,
    workspace_bytes: int | None = None,
    progress: Progress | None = None,
) -> None:
    """Build one engine from ``onnx_file`` with the spec's profile; write it to ``plan``."""
    trt = require_tensorrt()
    say = progress or (lambda m: logger.info("%s", m))
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file (not parse(bytes)) finds model.onnx.data beside the graph.
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; "fp32" means fp32 (seed contract)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {spec.component} (see the TensorRT log above)")
    _write_atomic(plan, bytes(serialized))
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


def verify_engine(
    runner: TensorRTRunner, module: torch.nn.Module, spec: ComponentSpec, precision: str
) -> dict[str, float]:
    """The engine vs torch (fp32) on random inputs at min/opt/max; EngineError beyond tolerance."""
    errors = {}
    for i, level in enumerate(PROFILE_LEVELS):
        shapes = spec.shapes(level)
        inputs = random_inputs(spec, shapes, seed=i, vocab=vocab_size(module), device=runner.device)
        with torch.no_grad():
            references = dict(zip(spec.output_names, module(**inputs), strict=True))
        actual = runner.run(inputs)
        measured = []
        for name, reference in references.items():
            ref = reference.float().cpu().numpy()
            err = max_abs_error(ref, actual[name].float().cpu().numpy())
            measured.append((err, float(np.abs(ref).max()) if ref.size else 0.0))
        errors[level], scale = max(measured, key=lambda m: m[0] / max(1.0, m[1]))
        check_error(spec.component, level, shapes, errors[level], scale, TOLERANCE[precision])
    return errors


def build_engines(
    repo: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    source: Path | None = None,
    device: str = "cuda",
    components: tuple[str, ...] | None = None,
    workspace_bytes: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build (or reuse, by content key) every component's engine; returns the updated manifest.

    ``source`` is the diffusers folder the repository came from, for verification against torch
    (default: the path recorded in the manifest; verification is skipped, with a warning, when
    it is gone).
    """
    if precision not in ("fp32", "fp16"):
        raise InvalidRequestError("precision", precision, "choose fp32 or fp16")
    trt = require_tensorrt()
    dev = require_cuda(torch.device(device))
    root = Path(repo)
    manifest = read_manifest(root)
    src = Path(source or manifest["source"]["path"])
    arch, version = gpu_arch(dev), trt.__version__
    timing_cache = root / f"timing-cache-trt{version}-{arch}.cache"
    say = progress or (lambda m: logger.info("%s", m))
    for name in components or tuple(manifest["components"]):
        entry = component_entry(manifest, name, root)
        spec = component_spec(manifest, name)
        key = engine_key(entry["onnx"]["sha256"], spec.profile, precision, version, arch)
        plan = root / name / engine_filename(key)
        known = find_engine(manifest, name, [key])
        if known and plan.is_file() and file_sha256(plan) == known.get("sha256"):
            say(f"{name}: TensorRT engine {plan.name} is up to date (key {key[:12]})")
            continue
        say(f"{name}: building TensorRT {precision} engine for {arch} (TensorRT {version}) ...")
        t0 = time.perf_counter()
        build_engine(
            onnx_path(root, name),
            spec,
            plan,
            precision=precision,
            timing_cache=timing_cache,
            workspace_bytes=workspace_bytes,
            progress=say,
        )
        build_s = time.perf_counter() - t0
        record: dict[str, Any] = {
            "key": key,
            "file": plan.relative_to(root).as_posix(),
            "sha256": file_sha256(plan),
            "bytes": plan.stat().st_size,
            "precision": precision,
            "tensorrt": version,
            "gpu_arch": arch,
            "build_s": round(build_s, 1),
        }
        if src.is_dir():
            module = load_component(src, name, dtype=torch.float32, device=dev, family=manifest.get("family"))
            errors = verify_engine(TensorRTRunner(plan, dev), module, spec, precision)
            del module
            record["verify"] = {"max_abs_error": errors, "tolerance": TOLERANCE[precision]}
            say(f"{name}: engine built in {build_s:.0f} s, max abs error {max(errors.values()):.3g} vs torch")
        else:
            logger.warning("%s: source model %s is gone; engine not verified against torch", name, src)
            say(f"{name}: engine built in {build_s:.0f} s (not verified: source model missing)")
        entry["engines"] = [e for e in entry.get("engines", []) if e.get("key") != key] + [record]
        write_manifest(root, manifest)  # after each engine: a failed later build keeps this one
    return manifest


__all__ = ["build_engine", "build_engines", "verify_engine"]
