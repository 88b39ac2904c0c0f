"""Every Serve config, the KubeRay RayService and the cluster-launcher YAML, checked offline.

Each Serve YAML under deployments/configs/ (and the RayService's serveConfigV2) must pass Ray's own
``ServeDeploySchema``, our ``AppConfig`` and Ray's options schemas, and build into exactly the four
deployments with the options the file asks for; the GPU ones must fit their GPUs (fractional
replicas packed per device, sums <= 1) on the clusters that the manifests describe. No Ray starts.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.serve.config import AutoscalingConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from deployments.cli import DEPLOYMENT_NAMES, OPTIONS_FIELD, load_serve_config  # noqa: E402
from deployments.config import AUTOSCALING_KEYS, AppConfig  # noqa: E402
from serve.cli import main as darkroom  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "deployments" / "configs"
SERVE_YAMLS = sorted(CONFIGS.glob("*.yaml"))
BUILDER = "deployments.app:build_app"
# The split app's configs (the others, e.g. the monolithic baseline, get Ray's schema check only).
SPLIT_YAMLS = [p for p in SERVE_YAMLS if BUILDER in p.read_text()]
RAYSERVICE = ROOT / "deployments" / "kuberay" / "rayservice.yaml"
LAUNCHER = ROOT / "deployments" / "cluster" / "aws-gpu.yaml"
DOCS = ROOT / "docs" / "deploying.md"
STAGES = ("TextEncoder", "Denoiser", "Decoder")
SERVERLESS = ("serverless.yaml", "gpu-serverless.yaml")
STEADY = ("steady.yaml", "gpu-cluster.yaml")
GPU_YAMLS = ("gpu-cluster.yaml", "gpu-serverless.yaml")
# GPUs per instance of the launcher's instance types (the launcher reads them from AWS).
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g6.2xlarge": 1, "p4d.24xlarge": 8}


def app_configs(raw: dict[str, Any]) -> list[AppConfig]:
    return [AppConfig.model_validate(a.get("args") or {}) for a in raw["applications"] if a["import_path"] == BUILDER]


def options(cfg: AppConfig, name: str):
    return getattr(cfg, OPTIONS_FIELD[name])


def replica_range(cfg: AppConfig, name: str) -> tuple[int, int]:
    opts = options(cfg, name)
    if opts.autoscaling_config:
        return opts.min_replicas, int(opts.autoscaling_config.get("max_replicas", 1))
    n = opts.num_replicas if isinstance(opts.num_replicas, int) else 1
    return n, n


def gpu_demand(cfg: AppConfig, which: int) -> list[float]:
    """num_gpus of every replica at the min (which=0) or max (which=1) replica counts."""
    demand = []
    for name in DEPLOYMENT_NAMES:
        gpus = float(options(cfg, name).ray_actor_options.get("num_gpus", 0) or 0)
        demand += [gpus] * replica_range(cfg, name)[which] if gpus else []
    return demand


def pack_gpus(demand: list[float], devices: int) -> list[float] | None:
    """First-fit-decreasing, as Ray places fractional GPU requests: each replica on one device.

    Returns each device's load (all <= 1), or None when the demand does not fit. Whole-GPU
    requests (1, 2, ...) take that many empty devices. Example: [1, 0.25, 0.25] on 2 devices ->
    [1.0, 0.5]; [0.75, 0.5] on 1 device -> None.
    """
    loads = [0.0] * devices
    for need in sorted(demand, reverse=True):
        if need >= 1:
            if need != int(need):
                return None  # Ray rejects e.g. 1.5 GPUs: more than one device but not whole
            free = [i for i, load in enumerate(loads) if load == 0.0][: int(need)]
            if len(free) < need:
                return None
            for i in free:
                loads[i] = 1.0
            continue
        for i, load in enumerate(loads):
            if load + need <= 1.0 + 1e-9:
                loads[i] += need
                break
        else:
            return None
    return loads


# -- every Serve YAML --------------------------------------------------------------------------


def test_the_expected_configs_exist():
    names = {p.name for p in SPLIT_YAMLS}
    assert {"local.yaml", *SERVERLESS, *STEADY} <= names, names


@pytest.mark.parametrize("path", SERVE_YAMLS, ids=lambda p: p.name)
def test_every_serve_yaml_passes_rays_schema(path: Path, capsys):
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert darkroom(["serve", "--config", str(path), "--check"]) == 0
    assert "valid Serve config" in capsys.readouterr().out


@pytest.mark.parametrize("path", SPLIT_YAMLS, ids=lambda p: p.name)
def test_serve_yaml_validates_with_ray_and_appconfig(path: Path):
    raw = yaml.safe_load(path.read_text())
    config = ServeDeploySchema.model_validate(raw)
    cfgs = app_configs(raw)
    assert cfgs, f"{path.name} builds no Darkroom application"
    for app in config.applications:
        # Per-deployment overrides, where a file lists any, name only Darkroom's deployments.
        if app.import_path == BUILDER:
            assert {d.name for d in app.deployments} <= set(DEPLOYMENT_NAMES)
    for cfg in cfgs:
        for name in DEPLOYMENT_NAMES:
            auto = options(cfg, name).autoscaling_config
            if auto:
                AutoscalingConfig.model_validate(auto)  # Ray's own model agrees
    load_serve_config(path)  # the `darkroom serve --config` path (Ray's option schemas too)


@pytest.mark.parametrize("path", SPLIT_YAMLS, ids=lambda p: p.name)
def test_darkroom_serve_check_describes_each_deployment(path: Path, capsys):
    assert darkroom(["serve", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "valid Serve config" in out
    for name in DEPLOYMENT_NAMES:
        assert f"  {name}: " in out


def test_apps_build_into_the_four_deployments_with_the_files_options():
    """Ray's own app builder (no cluster needed) on every file's args: names and options as given."""
    from ray.serve._private.build_app import build_app as ray_build_app

    from deployments.app import build_app

    for path in SPLIT_YAMLS:
        raw = yaml.safe_load(path.read_text())
        for app in raw["applications"]:
            if app["import_path"] != BUILDER:
                continue
            cfg = AppConfig.model_validate(app["args"])
            built = ray_build_app(build_app(app["args"]), name=app["name"])
            by_name = {d.name: d for d in built.deployments}
            # colocated: every stage inside the Ingress replica, which is the only deployment.
            expected = ("Ingress",) if cfg.profile == "colocated" else DEPLOYMENT_NAMES
            assert sorted(by_name) == sorted(expected), path.name
            assert built.ingress_deployment_name == "Ingress"
            for name, dep in by_name.items():
                opts = options(cfg, name)
                assert dep.ray_actor_options == opts.ray_actor_options, (path.name, name)
                auto = dep._deployment_config.autoscaling_config
                if opts.autoscaling_config:
                    lo, hi = replica_range(cfg, name)
                    assert (auto.min_replicas, auto.max_replicas) == (lo, hi), (path.name, name)
                    if "downscale_to_zero_delay_s" in opts.autoscaling_config:
                        assert auto.downscale_to_zero_delay_s == opts.autoscaling_config["downscale_to_zero_delay_s"]
                else:
                    assert auto is None and dep.num_replicas == opts.num_replicas, (path.name, name)


def test_autoscaling_keys_are_rays():
    """Our typo guard lists exactly the fields of Ray's AutoscalingConfig (Ray ignores unknown ones)."""
    assert set(AutoscalingConfig.model_fields) == AUTOSCALING_KEYS


@pytest.mark.parametrize("name", SERVERLESS)
def test_serverless_profiles_scale_every_stage_to_zero(name: str):
    (cfg,) = app_configs(yaml.safe_load((CONFIGS / name).read_text()))
    for stage in STAGES:
        opts = options(cfg, stage)
        assert opts.autoscaling and opts.min_replicas == 0, stage
        assert opts.autoscaling_config.get("initial_replicas", 0) == 0, stage
        # Longer than a request's trip through the other stages' cold starts (~10 s each on a
        # small CPU machine, see docs/deploying.md): otherwise a stage is back at zero before
        # a cold request has left the pipeline, and the next request pays again.
        assert opts.autoscaling_config["downscale_to_zero_delay_s"] >= 60, stage
    # The Ingress never goes to zero: it holds the routes and the async-job tasks.
    assert cfg.ingress.min_replicas >= 1 and not cfg.ingress.autoscaling


@pytest.mark.parametrize("name", STEADY)
def test_steady_profiles_keep_every_stage_warm(name: str):
    (cfg,) = app_configs(yaml.safe_load((CONFIGS / name).read_text()))
    for stage in (*STAGES, "Ingress"):
        assert options(cfg, stage).min_replicas >= 1, stage


@pytest.mark.parametrize("name", ["local.yaml", "serverless.yaml", "steady.yaml"])
def test_local_profiles_need_no_gpu(name: str):
    (cfg,) = app_configs(yaml.safe_load((CONFIGS / name).read_text()))
    assert cfg.model is None and cfg.storage == "./outputs"  # the tiny model, a local folder
    assert gpu_demand(cfg, 1) == []


@pytest.mark.parametrize("name", GPU_YAMLS)
def test_gpu_configs_request_gpus_as_intended(name: str):
    (cfg,) = app_configs(yaml.safe_load((CONFIGS / name).read_text()))
    gpus = {n: float(options(cfg, n).ray_actor_options.get("num_gpus", 0) or 0) for n in DEPLOYMENT_NAMES}
    assert gpus["Denoiser"] == 1.0  # the UNet: a whole GPU per replica
    assert 0 < gpus["TextEncoder"] < 1 and 0 < gpus["Decoder"] < 1  # fractions...
    assert gpus["TextEncoder"] + gpus["Decoder"] <= 1.0  # ...that share one GPU
    assert gpus["Ingress"] == 0 and cfg.ingress.ray_actor_options["resources"] == {"darkroom_ingress": 1}
    assert cfg.storage.startswith("s3://") and cfg.backend == "auto" and cfg.dtype == "float16"
    # A hub id (org/name) or an exported repository in S3: nothing that exists on one machine only.
    assert cfg.model.startswith("s3://") or re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.model), cfg.model
    # One replica of each stage fits on 2 GPUs; the maximum fits on ceil(sum) GPUs.
    assert pack_gpus([gpus["Denoiser"], gpus["TextEncoder"], gpus["Decoder"]], 2) == [1.0, 0.5]
    peak = gpu_demand(cfg, 1)
    assert pack_gpus(peak, math.ceil(sum(peak))) is not None


def test_gpu_packing_check_can_fail():
    assert pack_gpus([0.75, 0.5], 1) is None  # 1.25 of one GPU
    assert pack_gpus([1.0, 1.0, 0.25], 2) is None  # two whole GPUs taken, no room for 0.25
    assert pack_gpus([1.5], 2) is None  # not a whole number above 1
    assert pack_gpus([1.0, 0.25, 0.25, 0.25, 0.25], 2) == [1.0, 1.0]


# -- broken configs fail ------------------------------------------------------------------------


def _serverless_raw() -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / "serverless.yaml").read_text())


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda a: a["denoiser"]["autoscaling_config"].update(min_replica=0), "unknown key"),
        (lambda a: a["denoiser"]["autoscaling_config"].update(min_replicas=3, max_replicas=2), "max_replicas"),
        (lambda a: a["decoder"]["autoscaling_config"].update(initial_replicas=5), "initial_replicas"),
        (lambda a: a["text_encoder"]["autoscaling_config"].update(upscale_delay_s=-1), "upscale_delay_s"),
        (lambda a: a["denoiser"].update(max_ongoing_requests=4), "batches never fill"),
        (lambda a: a["denoiser"]["ray_actor_options"].update(num_gpu=1), "num_gpu"),
        (lambda a: a.update(modle="x"), "modle"),
    ],
    ids=["typo-key", "max<min", "initial>max", "negative-delay", "ongoing<batch", "actor-option-typo", "typo-arg"],
)
def test_a_broken_config_fails(tmp_path: Path, breakage, message: str, capsys):
    raw = _serverless_raw()
    breakage(raw["applications"][0]["args"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert darkroom(["serve", "--config", str(bad), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_a_file_ray_rejects_fails(tmp_path: Path, capsys):
    raw = _serverless_raw()
    raw["applications"].append(copy.deepcopy(raw["applications"][0]))  # duplicate app name
    bad = tmp_path / "dup.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="multiple configs"):
        ServeDeploySchema.model_validate(raw)
    assert darkroom(["serve", "--config", str(bad), "--check"]) == 2
    assert "--config" in capsys.readouterr().err


# -- KubeRay RayService -------------------------------------------------------------------------


def _rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def _custom_resources(start_params: dict[str, str]) -> dict[str, float]:
    """KubeRay's ``resources`` start param: a quoted JSON string, e.g. '"{\\"a\\": 1}"'."""
    raw = start_params.get("resources")
    return json.loads(shlex.split(raw)[0]) if raw else {}


def test_rayservice_is_a_kuberay_v1_rayservice():
    doc = _rayservice()
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    assert set(spec) == {"serveConfigV2", "rayClusterConfig"}
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image must run this Ray
    assert cluster["enableInTreeAutoscaling"] is True
    assert set(cluster) <= {
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headGroupSpec",
        "workerGroupSpecs",
    }


def test_rayservice_serve_config_validates_and_equals_gpu_cluster_yaml(tmp_path: Path):
    serve_config = _rayservice()["spec"]["serveConfigV2"]
    assert isinstance(serve_config, str)  # KubeRay wants a YAML string, not a mapping
    raw = yaml.safe_load(serve_config)
    ServeDeploySchema.model_validate(raw)
    assert len(app_configs(raw)) == 1
    copy_path = tmp_path / "serveConfigV2.yaml"
    copy_path.write_text(serve_config)
    load_serve_config(copy_path)
    assert raw == yaml.safe_load((CONFIGS / "gpu-cluster.yaml").read_text())


def test_rayservice_head_has_no_gpus_and_workers_request_them():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert _custom_resources(head["rayStartParams"]) == {"darkroom_ingress": 100}
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
        assert "darkroom_ingress" not in _custom_resources(group["rayStartParams"])


def test_rayservice_worker_groups_hold_the_min_and_the_max():
    doc = _rayservice()
    (cfg,) = app_configs(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]

    def devices(key: str) -> int:
        per_pod = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups]
        return sum(n * g[key] for n, g in zip(per_pod, groups, strict=True))

    assert pack_gpus(gpu_demand(cfg, 0), devices("minReplicas")) is not None
    assert pack_gpus(gpu_demand(cfg, 1), devices("maxReplicas")) is not None


# -- Ray cluster launcher -----------------------------------------------------------------------


def test_cluster_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu"]["min_worker"] = 1  # typo: the schema forbids it
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_cluster_launcher_has_a_cpu_head_and_autoscaled_gpu_workers():
    raw = yaml.safe_load(LAUNCHER.read_text())
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["darkroom_ingress"] >= 1
    assert head["node_config"]["InstanceType"] not in GPUS_PER_INSTANCE
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    gpu_devices = {"min": 0, "max": 0}
    for t in workers.values():
        per = GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]
        gpu_devices["min"] += per * t["min_workers"]
        gpu_devices["max"] += per * t["max_workers"]
    (cfg,) = app_configs(yaml.safe_load((CONFIGS / "gpu-cluster.yaml").read_text()))
    assert pack_gpus(gpu_demand(cfg, 0), gpu_devices["min"]) is not None
    assert pack_gpus(gpu_demand(cfg, 1), gpu_devices["max"]) is not None
    setup = " && ".join(raw["setup_commands"])
    assert "torch==2.13.0" in setup and "darkroom[gpu]" in setup
    # GPU workers prefetch the very repository gpu-serverless.yaml loads.
    (serverless,) = app_configs(yaml.safe_load((CONFIGS / "gpu-serverless.yaml").read_text()))
    assert f"resolve_model_path('{serverless.model}')" in " ".join(raw["worker_setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])


# -- the docs' commands -------------------------------------------------------------------------


def test_every_check_command_in_the_deploying_docs_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    commands = re.findall(r"^\s*(darkroom serve --config \S+ --check)\s*$", DOCS.read_text(), flags=re.M)
    assert len(commands) >= 4, commands
    for command in commands:
        args = shlex.split(command)[1:]
        assert darkroom(args) == 0, command
    capsys.readouterr()


def test_colocated_profile_is_one_ingress_holding_every_stage(capsys):
    """colocated.yaml: one Ingress replica runs the three stages; its --check says so, and the
    in-process baseline of each app gets the torch threads of its model replicas together."""
    raw = yaml.safe_load((CONFIGS / "colocated.yaml").read_text())
    (cfg,) = app_configs(raw)
    assert cfg.profile == "colocated" and cfg.model is None
    assert list(cfg.model_deployments()) == ["Ingress"] and cfg.model_torch_threads() == 1
    (split,) = app_configs(yaml.safe_load((CONFIGS / "local.yaml").read_text()))
    assert split.profile == "split" and split.model_torch_threads() == 3  # three 0.1-CPU replicas, 1 each
    wide = AppConfig.model_validate({"denoiser": {"num_replicas": 2, "torch_threads": 4}})
    assert wide.model_torch_threads() == 1 + 2 * 4 + 1
    assert darkroom(["serve", "--config", str(CONFIGS / "colocated.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "profile colocated" in out and "  Denoiser: inside each Ingress replica (colocated)" in out
    with pytest.raises(ValueError):
        AppConfig.model_validate({"profile": "fused"})


def test_serve_model_flag_replaces_every_apps_model():
    """``darkroom serve --config FILE --model M`` (what ``darkroom bench --serve FILE --model M``
    runs): every app serves M, in the deployed config and in the validated one; the file's other
    args stay."""
    from deployments.cli import _http_of, with_model

    path = CONFIGS / "side-by-side.yaml"
    _, apps = load_serve_config(path)
    raw, _, _ = _http_of(path, None, None)
    before = copy.deepcopy(raw)
    raw2, apps2 = with_model(raw, apps, "tiny")
    assert raw == before  # the file's dict is not changed in place
    assert [a["args"]["model"] for a in raw2["applications"]] == ["tiny"] * len(raw["applications"])
    assert {name: c.model for name, c in apps2.items()} == dict.fromkeys(apps, "tiny")
    for old, new in zip(raw["applications"], raw2["applications"], strict=True):
        assert {k: v for k, v in new["args"].items() if k != "model"} == old["args"]
    ServeDeploySchema.model_validate(raw2)
    for app in raw2["applications"]:
        if app["import_path"] == "deployments.app:build_app":
            assert AppConfig.model_validate(app["args"]).model == "tiny"


def test_gil_switch_interval_setting():
    """``gil_switch_interval_ms`` is validated, and what every replica's constructor applies
    (``replica_observability``) sets the process's interval; None leaves it."""
    import sys

    from deployments.observability import set_gil_switch_interval

    assert AppConfig.model_validate({}).gil_switch_interval_ms is None
    assert AppConfig.model_validate({"gil_switch_interval_ms": 0.5}).gil_switch_interval_ms == 0.5
    # What replicas set: the config's, else the profile's (colocated: a shorter one; split: Python's).
    assert AppConfig.model_validate({}).gil_interval_ms() is None
    assert AppConfig.model_validate({"profile": "colocated"}).gil_interval_ms() == 0.5
    assert AppConfig.model_validate({"profile": "colocated", "gil_switch_interval_ms": 5}).gil_interval_ms() == 5
    assert AppConfig.model_validate({"gil_switch_interval_ms": 2}).gil_interval_ms() == 2
    for bad in (0, 0.01, 1000):
        with pytest.raises(ValueError, match="gil_switch_interval_ms"):
            AppConfig.model_validate({"gil_switch_interval_ms": bad})
    original = sys.getswitchinterval()
    try:
        assert set_gil_switch_interval(None) == original and sys.getswitchinterval() == original
        assert set_gil_switch_interval(0.5) == original and sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(original)
