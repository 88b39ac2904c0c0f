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


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    cfg = cfg.model_copy(update={"storage": _absolute_storage(cfg.storage)})
    shared = cfg.model_dump(mode="json")
    if cfg.profile == "colocated":
        from deployments.colocated import build_colocated_app

        return build_colocated_app(cfg, shared)
    text_encoder = TextEncoderDeployment.options(**cfg.text_encoder.serve_options("TextEncoder")).bind(shared)
    denoiser = DenoiserDeployment.options(**cfg.denoiser.serve_options("Denoiser")).bind(shared)
    decoder = DecoderDeployment.options(**cfg.decoder.serve_options("Decoder")).bind(shared)
    return Ingress.options(**cfg.ingress.serve_options("Ingress")).bind(text_encoder, denoiser, decoder, shared)
