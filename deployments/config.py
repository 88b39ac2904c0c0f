"""The app's typed config: what ``build_app`` takes as ``args`` (from Python or a Serve YAML)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.api.schemas import Limits


class DeploymentOptions(BaseModel):
    """Ray Serve options of one deployment, plus its dynamic-batching settings."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(
        1, description="Fixed replica count; ignored when autoscaling_config is set."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None,
        description="Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...).",
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0.1},
        description="Ray actor options: num_cpus, num_gpus (fractions allowed), runtime_env, ...",
    )
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="Requests a replica works on at once; must be >= max_batch_size or batches never fill.",
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests a caller may queue before getting back-pressure (-1 = unbounded)."
    )
    max_batch_size: int = Field(8, ge=1, description="Most requests in one batched model call.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a partial batch waits for more requests."
    )

    @model_validator(mode="after")
    def _batch_fits(self) -> DeploymentOptions:
        # ray #43288: with max_ongoing_requests < max_batch_size batches silently never fill.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches never fill"
            )
        return self

    def serve_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "name": name,
            "ray_actor_options": self.ray_actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling_config:
            opts["autoscaling_config"] = self.autoscaling_config
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class AppConfig(BaseModel):
    """Everything ``build_app`` needs. Omitted fields give the embedded local default."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Diffusers folder, hub id or exported repository; None = tiny model."
    )
    model_name: str | None = Field(
        None, description="Name clients pass as `model`; default: the folder name."
    )
    backend: str = Field(
        "torch", description="Engine backend for every stage: torch, onnxruntime, tensorrt, auto."
    )
    device: str | None = Field(None, description="cpu, cuda, cuda:N; None = CUDA when present.")
    dtype: str | None = Field(
        None, description="float32, float16, bfloat16; None = fp16 on CUDA, fp32 on CPU."
    )
    storage: str = Field(
        "./outputs", description="Result store URI: a folder, file://..., or s3://bucket/prefix."
    )
    url_expiry_s: int = Field(3600, ge=1, le=604800, description="Lifetime of presigned S3 URLs.")
    limits: Limits = Field(default_factory=Limits, description="Request limits enforced at the Ingress.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="Whole-request limit; past it the client gets 504."
    )
    stage_timeout_s: float = Field(300.0, gt=0, description="Limit on each stage call from the Ingress.")
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_batch_size=1),
        description="Options of the Ingress deployment (batch settings unused).",
    )
    text_encoder: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_batch_size=16, max_ongoing_requests=64),
        description="Options of the TextEncoder deployment.",
    )
    denoiser: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            max_batch_size=8, max_ongoing_requests=32, batch_wait_timeout_s=0.02
        ),
        description="Options of the Denoiser deployment.",
    )
    decoder: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_batch_size=8, max_ongoing_requests=32),
        description="Options of the Decoder deployment.",
    )
