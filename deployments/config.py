"""The app's typed config: what ``build_app`` takes as ``args`` (from Python or a Serve YAML)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.api.limits import RateLimits
from serve.api.policy import PromptPolicy
from serve.api.request_limits import Limits

# Every field of Ray Serve 2.60's ``ray.serve.config.AutoscalingConfig``. Ray's model silently
# drops keys it does not know, so a typo such as ``min_replica: 0`` would deploy with Ray's
# default ``min_replicas: 1`` and never scale to zero; we reject unknown keys instead.
# tests/unit/test_serve_configs.py checks this set against Ray's own model.
AUTOSCALING_KEYS = frozenset(
    {
        "min_replicas",
        "initial_replicas",
        "max_replicas",
        "target_ongoing_requests",
        "metrics_interval_s",
        "look_back_period_s",
        "smoothing_factor",
        "upscale_smoothing_factor",
        "downscale_smoothing_factor",
        "upscaling_factor",
        "downscaling_factor",
        "downscale_delay_s",
        "downscale_to_zero_delay_s",
        "upscale_delay_s",
        "aggregation_function",
        "policy",
    }
)
_NON_NEGATIVE_KEYS = (
    "min_replicas",
    "initial_replicas",
    "downscale_delay_s",
    "downscale_to_zero_delay_s",
    "upscale_delay_s",
)
_POSITIVE_KEYS = (
    "max_replicas",
    "target_ongoing_requests",
    "metrics_interval_s",
    "look_back_period_s",
    "upscaling_factor",
    "downscaling_factor",
)


def check_autoscaling_config(config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the key for what Ray would reject (or silently ignore)."""
    unknown = sorted(set(config) - AUTOSCALING_KEYS)
    if unknown:
        raise ValueError(f"autoscaling_config: unknown key(s) {unknown}; known: {sorted(AUTOSCALING_KEYS)}")
    for key in _NON_NEGATIVE_KEYS + _POSITIVE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"autoscaling_config.{key} must be a number, got {value!r}")
        if key in _POSITIVE_KEYS and value <= 0:
            raise ValueError(f"autoscaling_config.{key} must be > 0, got {value!r}")
        if value < 0:
            raise ValueError(f"autoscaling_config.{key} must be >= 0, got {value!r}")
    for key in ("min_replicas", "initial_replicas", "max_replicas"):
        value = config.get(key)
        if value is not None and not isinstance(value, int):
            raise ValueError(f"autoscaling_config.{key} must be an integer, got {value!r}")
    # Ray's defaults when a key is absent: min_replicas 1, max_replicas 1.
    lo, hi = config.get("min_replicas", 1), config.get("max_replicas", 1)
    if hi < lo:
        raise ValueError(f"autoscaling_config: max_replicas ({hi}) must be >= min_replicas ({lo})")
    initial = config.get("initial_replicas")
    if initial is not None and not lo <= initial <= hi:
        raise ValueError(
            f"autoscaling_config: initial_replicas ({initial}) must be within min_replicas..max_replicas ({lo}..{hi})"
        )


#: The colocated profile's GIL switch interval when the config sets none (``gil_interval_ms``):
#: at 16 clients on the 2-core dev machine, 1.10x (0.94-1.13) the img/s of Python's 5 ms, A/B in one
#: run (bench/results/2026-12-03-colocated-gil-interval-ab-tiny/); neutral at 1 and 8 clients.
COLOCATED_GIL_SWITCH_INTERVAL_MS = 0.5


class DeploymentOptions(BaseModel):
    """Ray Serve options of one deployment, plus its dynamic-batching settings."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = Field(
        1,
        description='Fixed replica count; ignored when autoscaling_config is set. "auto" = Ray\'s '
        "default autoscaling (min 1, max 100, target 2), overridden by autoscaling_config's keys.",
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
        0.0,
        ge=0,
        description="How long a partial batch waits for more requests (TextEncoder, Decoder). 0 still batches "
        "under load: requests queue while a batch runs. The Denoiser ignores it: it batches continuously.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads in each replica (torch.set_num_threads); None = what Ray gives a "
        "replica (OMP_NUM_THREADS = its num_cpus rounded down, at least 1). The in-process baseline of "
        "`darkroom bench --serve` gets the model replicas' total.",
    )
    graceful_shutdown_timeout_s: float | None = Field(
        None,
        ge=0,
        description="How long a replica being scaled down may finish its ongoing requests "
        "(Ray's default 20 s when None); set it above the longest batch.",
    )

    @model_validator(mode="after")
    def _autoscaling_valid(self) -> DeploymentOptions:
        if self.autoscaling_config:
            check_autoscaling_config(self.autoscaling_config)
        if isinstance(self.num_replicas, int) and self.num_replicas < 0:
            raise ValueError(f"num_replicas must be >= 0, got {self.num_replicas}")
        return self

    @property
    def autoscaling(self) -> bool:
        """Whether Serve sizes this deployment (autoscaling_config set or num_replicas "auto")."""
        return bool(self.autoscaling_config) or self.num_replicas == "auto"

    @property
    def min_replicas(self) -> int:
        """The fewest replicas this deployment can have: 0 means it can scale to zero."""
        if self.autoscaling_config:
            return int(self.autoscaling_config.get("min_replicas", 1))
        if self.num_replicas == "auto":
            return 1
        return self.num_replicas if self.num_replicas is not None else 1

    @model_validator(mode="after")
    def _batch_fits(self) -> DeploymentOptions:
        # ray #43288: with max_ongoing_requests < max_batch_size batches silently never fill.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches never fill"
            )
        return self

    @property
    def threads_per_replica(self) -> int:
        """Torch threads each replica runs with: ``torch_threads``, else Ray's OMP_NUM_THREADS rule
        (``num_cpus`` rounded down, at least 1: a 0.1-CPU replica gets 1 thread)."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, int(float(self.ray_actor_options.get("num_cpus", 1) or 0)))

    @property
    def max_replica_count(self) -> int:
        """The most replicas this deployment may run (its fixed count, or autoscaling's maximum)."""
        if self.autoscaling_config:
            return int(self.autoscaling_config.get("max_replicas", 1))
        if self.num_replicas == "auto":
            return 100
        return self.num_replicas if self.num_replicas is not None else 1

    def serve_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "name": name,
            "ray_actor_options": self.ray_actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.num_replicas == "auto":
            # Ray merges autoscaling_config's keys over its "auto" defaults.
            opts["num_replicas"] = "auto"
            if self.autoscaling_config:
                opts["autoscaling_config"] = self.autoscaling_config
        elif self.autoscaling_config:
            opts["autoscaling_config"] = self.autoscaling_config
        else:
            opts["num_replicas"] = self.num_replicas
        if self.graceful_shutdown_timeout_s is not None:
            opts["graceful_shutdown_timeout_s"] = self.graceful_shutdown_timeout_s
        return opts


class TorchConfig(BaseModel):
    """The torch backend's GPU path (serve/engines/torch_options.py). Defaults: eager PyTorch as
    published (channels_last on CUDA); graphs, compile and tiling are opt-in."""

    model_config = ConfigDict(extra="forbid")

    channels_last: bool | None = Field(
        None, description="channels_last memory format for the UNet and VAE; None = on CUDA, off on CPU."
    )
    cuda_graphs: bool = Field(
        False, description="Capture the denoiser as CUDA graphs per (batch bucket, input shapes) and replay them."
    )
    compile: bool = Field(
        False, description="torch.compile the denoiser (the first call per bucket and size compiles)."
    )
    jit: bool = Field(
        False,
        description="Trace the denoiser with TorchScript once per input shapes and replay the traces (the same "
        "ops; on CPU its forward then runs without holding Python's GIL, so a colocated replica serves HTTP beside "
        "it). The first batch of each shape pays the trace.",
    )
    compile_mode: str = Field("max-autotune-no-cudagraphs", description="torch.compile mode when compile is on.")
    warm_up: bool = Field(
        True,
        description="With jit, cuda_graphs or compile: trace, capture or compile the denoiser when a replica loads, "
        "for batches of 1..denoiser.max_batch_size single-image requests at the model's native size (one step "
        "each), so no request waits for them; other sizes pay on their first batch. Load takes that much longer.",
    )
    batch_buckets: tuple[int, ...] = Field(
        (1, 2, 4, 8, 16, 32, 64),
        description="With cuda_graphs or compile: denoiser batches (rows, CFG doubled) are padded up to the next "
        "of these sizes, so one graph serves every batch that fits it.",
    )
    max_graphs: int = Field(
        24, ge=1, description="Captured CUDA graphs kept per replica (least recently used dropped)."
    )
    vae_tiling_min_side: int | None = Field(
        None,
        ge=64,
        description="Decode in tiles when an image side exceeds this many pixels (bounded memory; tiles blend at "
        "their seams, outside the seed contract); None = never.",
    )

    def options(self) -> Any:
        from serve.engines.torch_options import TorchOptions

        return TorchOptions(**self.model_dump())


class StepCacheConfig(BaseModel):
    """The opt-in step cache every request gets (serve/engines/step_cache.py): faster, at a measured
    cost in fidelity (bench/gpu.py); images then differ from diffusers' beyond the seed contract."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["deepcache", "teacache"] = Field(
        ..., description="deepcache for UNet models (SD, SDXL), teacache for transformers (Flux)."
    )
    interval: int = Field(3, ge=1, description="deepcache: a full UNet pass every this many steps.")
    threshold: float = Field(
        0.2, ge=0, description="teacache: accumulated rescaled change of the first block's input before it runs again."
    )

    def message(self) -> Any:
        from serve.stages.messages import StepCache

        return StepCache(self.kind, self.interval, self.threshold)


class AppConfig(BaseModel):
    """Everything ``build_app`` needs. Omitted fields give the embedded local default."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Diffusers folder, hub id or exported repository; None = the shipped demo model."
    )
    family: Literal["sd", "sdxl", "flux"] | None = Field(
        None, description="Model family; None = the one model_index.json's _class_name names."
    )
    model_name: str | None = Field(None, description="Name clients pass as `model`; default: the folder name.")
    backend: str = Field("torch", description="Engine backend for every stage: torch, onnxruntime, tensorrt, auto.")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; None = DARKROOM_DEVICE, else CUDA when present.")
    dtype: str | None = Field(
        None, description="float32, float16, bfloat16; None = DARKROOM_DTYPE, else fp16 on CUDA, fp32 on CPU."
    )
    profile: Literal["split", "colocated"] = Field(
        "split",
        description="split: a deployment per stage (Ingress, TextEncoder, Denoiser, Decoder), each scaling apart. "
        "colocated: every stage inside each Ingress replica (one replica per GPU, the same batching, no stage "
        "hops); `ingress` then sets the replicas and resources, and text_encoder/denoiser/decoder only their "
        "batching (max_batch_size, batch_wait_timeout_s).",
    )
    storage: str = Field("./outputs", description="Result store URI: a folder, file://..., or s3://bucket/prefix.")
    url_expiry_s: int = Field(3600, ge=1, le=604800, description="Lifetime of presigned S3 URLs.")
    limits: Limits = Field(default_factory=Limits, description="Request limits enforced at the Ingress.")
    request_timeout_s: float = Field(300.0, gt=0, description="Whole-request limit; past it the client gets 504.")
    stage_timeout_s: float = Field(300.0, gt=0, description="Limit on each stage call from the Ingress.")
    api_keys: tuple[str, ...] = Field(
        (), description="Bearer keys every route but /healthz and /readyz needs (plus DARKROOM_API_KEYS); empty = open."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; bigger ones get 413.")
    prompt_policy: PromptPolicy = Field(
        default_factory=PromptPolicy,
        description="The content policy: prompts refused with 400, and the optional image safety check.",
    )
    rate_limits: RateLimits = Field(
        default_factory=RateLimits,
        description="Per API key: requests per minute and images in flight (429 with Retry-After). "
        "Enforced by each Ingress replica on its own (docs/operating.md says why).",
    )
    job_lease_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A running job's lease in the result store, renewed by its Ingress every third of it; a job "
        "whose lease ran out (its Ingress died) is resumed by another Ingress replica.",
    )
    job_attempts: int = Field(
        3, ge=1, le=10, description="Tries per job (the first and resumptions after a lost lease) before it fails."
    )
    gil_switch_interval_ms: float | None = Field(
        None,
        ge=0.05,
        le=100,
        description="Python's GIL switch interval in every replica (sys.setswitchinterval), in ms: how long a "
        "thread that wants the GIL waits before the holder must drop it. None: the profile's default, "
        f"{COLOCATED_GIL_SWITCH_INTERVAL_MS:g} ms for colocated (its model thread takes the GIL back sooner from "
        "the HTTP and Ray threads of its process; measured in bench/results) and Python's 5 ms for split "
        "(python -m bench.gil).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the replicas' own log lines; each names its stage and request id."
    )
    stage_retries: int = Field(
        5, ge=1, le=20, description="Tries per stage call when a replica dies mid-request (calls are idempotent)."
    )
    job_poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often a running job rewrites its record with its progress and checks the store for a "
        "cancel sent to another Ingress replica; also how often a job's event stream served by another replica "
        "polls that record.",
    )
    torch: TorchConfig = Field(
        default_factory=TorchConfig, description="The torch backend's GPU path: CUDA graphs, compile, tiling."
    )
    step_cache: StepCacheConfig | None = Field(
        None, description="Opt-in step cache for every request (off: images meet the seed contract)."
    )
    debug_step_delay_s: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Fault-injection hook for tests, 0 in production: the Denoiser sleeps this long after "
        "every UNet step, so a test can make a request certainly outlast a timeout on any machine.",
    )
    lora_repository: str | None = Field(
        None,
        description="LoRA adapters requests may choose (`loras`): a folder or s3://bucket/prefix of "
        "<name>.safetensors files (diffusers/peft or kohya keys); a file added is usable without a restart. "
        "None: requests with loras get a 400.",
    )
    lora_cache_bytes: int = Field(
        1 << 30,
        ge=1,
        description="Bytes of adapter weights each TextEncoder and Denoiser replica keeps loaded (LRU; adapters "
        "of requests in flight are never evicted).",
    )
    lora_batching: Literal["mixed", "one_group"] = Field(
        "mixed",
        description="mixed: requests with different adapters share each denoiser step. one_group: the benchmark "
        "baseline, one adapter set in the batch at a time (as a server that merges adapters into its weights).",
    )
    lora_routing: Literal["affinity", "plain"] = Field(
        "affinity",
        description="With adapters and several Denoiser replicas: affinity sends a request to a replica that "
        "holds its adapters (unless its queue is much longer); plain is Serve's power of two choices.",
    )
    debug_reply_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Fault-injection hook for tests, 0 in production: TextEncoder and Decoder calls wait this long "
        "after their work (the Decoder after storing) before answering, so a test can kill a replica while "
        "calls are certainly in flight.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="S3 client options: max_attempts (retries, standard mode), connect_timeout, read_timeout (s).",
    )
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_batch_size=1),
        description="Options of the Ingress deployment (batch settings unused).",
    )
    text_encoder: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_batch_size=16, max_ongoing_requests=64),
        description="Options of the TextEncoder deployment.",
    )
    denoiser: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_batch_size=8, max_ongoing_requests=32),
        description="Options of the Denoiser deployment.",
    )
    decoder: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_batch_size=8, max_ongoing_requests=32),
        description="Options of the Decoder deployment.",
    )

    def lora_kwargs(self) -> dict[str, Any]:
        """How the TextEncoder and Denoiser load adapters (nothing when there is no repository)."""
        if self.lora_repository is None:
            return {}
        return {"loras": self.lora_repository, "lora_cache_bytes": self.lora_cache_bytes}

    def lora_catalog(self, info: Any) -> Any:
        """The Ingress's torch-free view of the adapter repository (None without one)."""
        if self.lora_repository is None:
            return None
        from serve.families import family_of
        from serve.lora import LoraCatalog, LoraRepository

        return LoraCatalog(LoraRepository(self.lora_repository), family_of(info))

    def model_deployments(self) -> dict[str, DeploymentOptions]:
        """The deployments that run models, by name: the three stages (split), or the Ingress (colocated)."""
        if self.profile == "colocated":
            return {"Ingress": self.ingress}
        return {"TextEncoder": self.text_encoder, "Denoiser": self.denoiser, "Decoder": self.decoder}

    def gil_interval_ms(self) -> float | None:
        """The GIL switch interval every replica of the app sets (``replica_observability``) and the
        bench's in-process baseline copies: the config's, else the profile's (None: Python's)."""
        if self.gil_switch_interval_ms is not None:
            return self.gil_switch_interval_ms
        return COLOCATED_GIL_SWITCH_INTERVAL_MS if self.profile == "colocated" else None

    def model_torch_threads(self) -> int:
        """Torch threads of every model replica together, at their most replicas: what the
        in-process baseline of this app gets (``darkroom bench --serve``, capped at the machine's cores)."""
        return sum(o.threads_per_replica * max(1, o.max_replica_count) for o in self.model_deployments().values())

    def model_info(self) -> Any:
        """The configured model (the embedded default when none) of the configured family."""
        from serve.model import read_model_info, resolve_source

        return read_model_info(resolve_source(self.model), self.family)

    def load_kwargs(self) -> dict[str, Any]:
        """How every stage loads its engines: backend, and device/dtype (config, else the environment)."""
        from serve.settings import Settings

        settings = Settings.from_env()
        return {
            "backend": self.backend,
            "device": self.device or settings.device,
            "dtype": self.dtype or settings.dtype,
            "torch_options": self.torch.options(),
        }

    def step_cache_message(self) -> Any:
        """The Denoiser's default step cache (None: off)."""
        return self.step_cache.message() if self.step_cache is not None else None

    def service_config(self, model_name: str) -> Any:
        """The request layer's config, for every app (split, monolith): auth, limits, policy, timeouts,
        per-key limits and job leases: one builder, so no app can serve with less of them."""
        from serve.api.service import ServiceConfig
        from serve.settings import Settings

        return ServiceConfig(
            model_name=self.model_name or model_name,
            limits=self.limits,
            request_timeout_s=self.request_timeout_s,
            stage_timeout_s=self.stage_timeout_s,
            prompt_policy=self.prompt_policy,
            api_keys=tuple(dict.fromkeys(self.api_keys + Settings.from_env().api_keys)),
            max_body_bytes=self.max_body_bytes,
            backend=self.backend,
            rate_limits=self.rate_limits,
            job_lease_s=self.job_lease_s,
            job_attempts=self.job_attempts,
            job_poll_s=self.job_poll_s,
        )
