"""A request's per-stage timings (ms), as the response's ``timings`` and the bench report them.

Pure: from the three stage results and the Ingress's clock marks around them. A stage's queue
time is its wall time at the Ingress less its compute; the VAE pass the Denoiser ran in its step
loop (colocated profile, ``decoded_s``) is the Decoder's time, so it is not queueing either.
"""

from __future__ import annotations

from serve.stages.messages import StageResult


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def stage_timings(
    enc: StageResult, den: StageResult, dec: StageResult, marks: tuple[float, float, float, float]
) -> dict[str, float]:
    """``marks``: perf_counter before the encode, the denoise and the decode call, and after it."""
    t0, t1, t2, t3 = marks
    storage_s = dec.extra.get("storage_s", 0.0)
    timings = {
        "encode": ms(enc.compute_s),
        "denoise": ms(den.compute_s),
        "decode": ms(dec.compute_s - storage_s),
        "storage": ms(storage_s),
        "encode_queue": ms(max(0.0, (t1 - t0) - enc.compute_s)),
        "denoise_queue": ms(max(0.0, (t2 - t1) - den.compute_s - den.extra.get("decoded_s", 0.0))),
        "decode_queue": ms(max(0.0, (t3 - t2) - dec.compute_s)),
        "encode_batch": float(enc.batch_size),
        "denoise_batch": float(den.batch_size),
        "decode_batch": float(dec.batch_size),
        "total": ms(t3 - t0),
    }
    for key in ("lora_hits", "lora_misses"):  # the Denoiser's adapter cache, for the bench
        if key in den.extra:
            timings[key] = float(den.extra[key])
    return timings


__all__ = ["ms", "stage_timings"]
