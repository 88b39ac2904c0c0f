"""The colocated profile (``AppConfig.profile: colocated``): every stage inside the Ingress replica.

One deployment, named ``Ingress`` like the split app's entry point, serves HTTP and runs the
TextEncoder, Denoiser and Decoder in-process (``serve.stages.colocated.ColocatedStages``) with
the split profile's batching: continuous batching in the Denoiser, batch queues for the text
encoder and the VAE. The deployment-name contract holds: the names are those of the split app,
and the stages that have no deployment of their own here still answer under their names in
``/readyz`` and in the timings. ``ingress`` options size the replica (replicas, GPUs, CPUs,
``torch_threads``); ``text_encoder``/``denoiser``/``decoder`` set only their batching.

The natural shape for a single-GPU node (one replica per GPU) and for small CPU machines: no
stage hop, no copy of arrays between processes, one Ray process instead of four.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import AppConfig
from deployments.observability import replica_observability
from serve.api.http import create_app
from serve.api.service import ImageService
from serve.stages.batching import BatchPolicy
from serve.stages.colocated import ColocatedOptions, ColocatedStages
from serve.storage import open_store

logger = logging.getLogger(__name__)


def colocated_options(cfg: AppConfig) -> ColocatedOptions:
    """The stages' batching from their config sections (their replica options do not apply)."""
    return ColocatedOptions(
        text_batch=BatchPolicy(cfg.text_encoder.max_batch_size, cfg.text_encoder.batch_wait_timeout_s),
        decode_batch=BatchPolicy(cfg.decoder.max_batch_size, cfg.decoder.batch_wait_timeout_s),
        max_requests=cfg.denoiser.max_batch_size,
        step_delay_s=cfg.debug_step_delay_s,
        lora_batching=cfg.lora_batching,
    )


def stage_loader(cfg: AppConfig, info: Any):
    """What the model thread runs first: pin torch's threads, then load the three stages (and the
    policy's image safety checker, as the split Decoder does)."""

    def load():
        import torch

        from deployments.stages import attach_safety_checker
        from serve.stages import Decoder, Denoiser, TextEncoder

        torch.set_num_threads(cfg.ingress.threads_per_replica)
        kw = cfg.load_kwargs()
        lkw = cfg.lora_kwargs()
        if lkw:  # one repository for both stages (listed once per lookup, not twice)
            from serve.lora import LoraRepository

            lkw["loras"] = LoraRepository(lkw["loras"])
        denoiser = Denoiser.load(info, **kw, **lkw, step_cache=cfg.step_cache_message())
        denoiser.warm_up(cfg.denoiser.max_batch_size)  # traces, graphs or compiles only; else nothing
        decoder = Decoder.load(info, **kw)
        attach_safety_checker(decoder, cfg, info)
        return TextEncoder.load(info, **kw, **lkw), denoiser, decoder

    return load


@serve.deployment(name="Ingress")
@serve.ingress()  # late-bound, like deployments.ingress.Ingress
class ColocatedIngress:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        # Logging with request ids and the replica's metrics: the stages inside record under
        # their own ``stage`` labels (TextEncoder, Denoiser, Decoder), as in the split profile.
        metrics = replica_observability("Ingress", cfg.log_level, cfg.gil_interval_ms())
        info = cfg.model_info()
        store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        # The stages load in the background (the model thread): /healthz answers at once,
        # /readyz names them "loading" until they are ready, requests wait for them.
        self.stages = ColocatedStages(stage_loader(cfg, info), store, colocated_options(cfg), metrics=metrics)
        # The one service-config builder: auth, limits, policy, per-key limits, job leases.
        self.service = ImageService(
            cfg.service_config(info.name), info, self.stages, store, loras=cfg.lora_catalog(info), metrics=metrics
        )

    def __serve_build_asgi_app__(self):
        return create_app(self.service, behind_serve_proxy=True)

    async def check_health(self) -> None:
        # As the split Ingress: starts the job sweeper of a replica that has served no request
        # yet (a replacement must resume its dead predecessor's jobs).
        self.service.start_background()


def build_colocated_app(cfg: AppConfig, shared: dict[str, Any]) -> Application:
    return ColocatedIngress.options(**cfg.ingress.serve_options("Ingress")).bind(shared)
