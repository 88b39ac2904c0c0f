"""``build_app``: the app builder Serve YAMLs point at (``import_path: deployments.app:build_app``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.config import AppConfig
from deployments.ingress import Ingress
from deployments.stages import DecoderDeployment, DenoiserDeployment, TextEncoderDeployment


def _absolute_storage(uri: str) -> str:
    """Replicas do not share the caller's working directory: pin relative folders here."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def denoiser_routing(cfg: AppConfig) -> dict[str, Any]:
    """The Denoiser's request router: LoRA affinity when adapters are served (and asked for), and
    replicas report the adapters they hold every second (Serve's default period is 10 s)."""
    if cfg.lora_repository is None:
        return {}
    from ray.serve.config import RequestRouterConfig

    if cfg.lora_routing == "affinity":
        config = RequestRouterConfig(
            request_router_class="deployments.routing:LoraAffinityRouter", request_routing_stats_period_s=1.0
        )
    else:
        config = RequestRouterConfig(request_routing_stats_period_s=1.0)
    return {"request_router_config": config}


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    update = {"storage": _absolute_storage(cfg.storage)}
    if cfg.lora_repository is not None:
        update["lora_repository"] = _absolute_storage(cfg.lora_repository)
    cfg = cfg.model_copy(update=update)
    shared = cfg.model_dump(mode="json")
    if cfg.profile == "colocated":
        from deployments.colocated import build_colocated_app

        return build_colocated_app(cfg, shared)
    text_encoder = TextEncoderDeployment.options(**cfg.text_encoder.serve_options("TextEncoder")).bind(shared)
    denoiser = DenoiserDeployment.options(**cfg.denoiser.serve_options("Denoiser"), **denoiser_routing(cfg)).bind(
        shared
    )
    decoder = DecoderDeployment.options(**cfg.decoder.serve_options("Decoder")).bind(shared)
    return Ingress.options(**cfg.ingress.serve_options("Ingress")).bind(text_encoder, denoiser, decoder, shared)
