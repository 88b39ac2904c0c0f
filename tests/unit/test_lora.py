"""serve.lora's parts without a model run: headers, the repository's listing policy, the Ingress's
checks, the adapter cache, row runs, the one-group baseline's admission and the affinity ranking."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from serve.errors import InvalidRequestError
from serve.lora.files import HeaderError, check_choices, facts, fit, parse_header, read_header
from serve.lora.policy import adapter_set, one_group_admission
from serve.lora.repository import LoraRepository, listing_is_stale

ROOT = Path(__file__).resolve().parents[2]


def _safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A header-only safetensors file (zeros for data): enough for everything torch-free."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def test_header_and_facts_of_both_layouts(tmp_path):
    diffusers = _safetensors(
        tmp_path / "a.safetensors",
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 768),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": (320, 4),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 768),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (768, 4),
        },
    )
    kohya = _safetensors(
        tmp_path / "b.safetensors",
        {
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 4),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha": (),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (1280, 4),
        },
    )
    with open(diffusers, "rb") as f:
        a = facts(read_header(f))
    with open(kohya, "rb") as f:
        b = facts(read_header(f))
    assert (a.layout, a.components, a.cross_attention_width, a.text_widths) == (
        "diffusers",
        ("text_encoder", "denoiser"),
        768,
        {"text_encoder": 768},
    )
    assert (b.layout, b.components, b.cross_attention_width) == ("kohya", ("text_encoder_2", "denoiser"), 2048)
    with pytest.raises(HeaderError):
        facts(parse_header(json.dumps({"unet.conv.weight": {"dtype": "F32", "shape": [1]}}).encode()))
    with pytest.raises(HeaderError):
        parse_header(b"not json")


def _configs(unet_cross=768, hidden=768):
    table = {"unet": {"cross_attention_dim": unet_cross}, "text_encoder": {"hidden_size": hidden}}
    return lambda folder: table.get(folder, {})


def test_fit_names_the_family_and_the_width():
    sd15 = SimpleNamespace(
        layout="diffusers",
        components=("text_encoder", "denoiser"),
        cross_attention_width=768,
        text_widths={"text_encoder": 768},
        flux_blocks=False,
        stacked_blocks=False,
    )
    assert fit(sd15, "sd", "unet", ("text_encoder",), _configs()).ok
    xl = fit(sd15, "sdxl", "unet", ("text_encoder", "text_encoder_2"), _configs(unet_cross=2048))
    assert xl.family == "sd" and "is a sd adapter; this server serves sdxl models" in xl.problem
    te2 = SimpleNamespace(**{**sd15.__dict__, "components": ("text_encoder_2", "denoiser")})
    assert "is a sdxl adapter" in fit(te2, "sd", "unet", ("text_encoder",), _configs()).problem
    flux = SimpleNamespace(**{**sd15.__dict__, "flux_blocks": True, "cross_attention_width": None})
    assert "is a flux adapter" in fit(flux, "sd", "unet", ("text_encoder",), _configs()).problem


def test_check_choices_names_the_item():
    assert check_choices([{"name": "ink", "scale": 2}], max_loras=4, max_scale=4) == (("ink", 2.0),)
    cases = [
        ([{"name": "ink", "scale": 4.5}], "loras[0].scale"),
        ([{"name": "ink"}, {"name": "../x"}], "loras[1].name"),
        ([{"name": "ink"}, {"name": "ink"}], "loras[1].name"),
        ([{"name": "a"}] * 5, "loras"),
        ([{"name": "a", "scale": True}], "loras[0].scale"),
    ]
    for value, field in cases:
        with pytest.raises(InvalidRequestError) as exc:
            check_choices(value, max_loras=4, max_scale=4)
        assert exc.value.field == field


def test_listing_policy_is_a_function_of_time():
    assert listing_is_stale(None, 0.0, ttl_s=5, missing=False, miss_ttl_s=0.5)
    assert not listing_is_stale(10.0, 12.0, ttl_s=5, missing=False, miss_ttl_s=0.5)
    assert listing_is_stale(10.0, 15.0, ttl_s=5, missing=False, miss_ttl_s=0.5)
    assert not listing_is_stale(10.0, 10.2, ttl_s=5, missing=True, miss_ttl_s=0.5)
    assert listing_is_stale(10.0, 10.6, ttl_s=5, missing=True, miss_ttl_s=0.5)


def test_a_file_dropped_in_is_found_without_a_restart(tmp_path):
    now = [100.0]
    repo = LoraRepository(str(tmp_path), clock=lambda: now[0])
    _safetensors(tmp_path / "ink.safetensors", {"unet.x.lora_A.weight": (1, 1)})
    assert repo.entry("ink").size > 0 and repo.listings == 1
    (tmp_path / "notes.txt").write_text("not an adapter")
    _safetensors(tmp_path / "oil.safetensors", {"unet.x.lora_A.weight": (1, 1)})
    with pytest.raises(InvalidRequestError) as exc:  # the listing is 0 s old: no relist yet
        repo.entry("oil", "loras[1].name")
    assert exc.value.field == "loras[1].name" and repo.listings == 1
    now[0] += 0.6  # older than miss_ttl_s: a missing name lists again
    assert repo.entry("oil").name == "oil" and repo.listings == 2
    assert sorted(repo.entries()) == ["ink", "oil"]
    before = repo.entry("ink").version
    _safetensors(tmp_path / "ink.safetensors", {"unet.x.lora_A.weight": (2, 1)})
    now[0] += 5.0
    assert repo.entry("ink").version != before  # a replaced file is a new version


def test_adapter_cache_evicts_lru_and_never_a_pinned_one():
    from serve.lora.runtime import AdapterCache

    def adapter(name, nbytes):
        return SimpleNamespace(name=name, version="1", nbytes=nbytes)

    cache = AdapterCache(max_bytes=250)
    cache.put(adapter("a", 100))
    cache.put(adapter("b", 100))
    cache.pin(["a"])
    assert cache.put(adapter("c", 100)) == ["b"]  # a is pinned: b, the next least recent, goes
    assert cache.names() == ["a", "c"]
    cache.pin(["c"])
    assert cache.put(adapter("d", 100), pin=True) == []  # everything in use: over the bound for now
    assert cache.nbytes == 300
    cache.unpin(["a"])
    assert cache.shrink() == ["a"] and cache.nbytes <= 250
    assert cache.get("c", "1") is not None and cache.get("c", "2") is None  # another version: a miss


def test_row_runs_slice_like_the_batch():
    from serve.lora.runtime import slice_runs

    runs = [(2, (("ink", 1.0),)), (4, ()), (2, (("oil", 0.5),))]
    assert slice_runs(runs, 0, 3) == [(2, (("ink", 1.0),)), (1, ())]
    assert slice_runs(runs, 3, 8) == [(3, ()), (2, (("oil", 0.5),))]
    assert slice_runs(runs, 6, 7) == [(1, (("oil", 0.5),))]


def test_one_group_baseline_admission():
    a, b = adapter_set([("ink", 1.0)]), adapter_set([("oil", 1.0)])
    assert one_group_admission([a, b, a, a], [], room=8) == [0, 2, 3]
    assert one_group_admission([a, b, a, a], [], room=2) == [0, 2]
    assert one_group_admission([a, b], [a], room=8) == []  # b waits: the running set drains first
    assert one_group_admission([a, a], [a], room=1) == [0]  # nothing else waits: join
    assert one_group_admission([b], [], room=8) == [0]
    assert adapter_set([("oil", 1), ("ink", 2)]) == adapter_set([("ink", 2.0), ("oil", 1.0)])


def test_affinity_ranking():
    from deployments.routing import rank_replicas

    held = {"r1": {"ink"}, "r2": set()}
    assert rank_replicas(["r1", "r2"], ["ink"], held, {"r1": 3, "r2": 1}, max_imbalance=4) == [
        ["r1"],
        ["r2", "r1"],
    ]
    assert rank_replicas(["r1", "r2"], ["ink"], held, {"r1": 3, "r2": 1}, max_imbalance=1) == [["r2", "r1"]]
    assert rank_replicas(["r1", "r2"], ["oil"], held, {"r1": 0, "r2": 2}, max_imbalance=4) == [["r1", "r2"]]
    # Nobody holds oil, queues are equal: r2 has room (holds fewer adapters), so adapters spread.
    assert rank_replicas(["r1", "r2"], ["oil"], held, {"r1": 1, "r2": 1}, max_imbalance=4) == [["r2", "r1"]]
    plain = rank_replicas(["r1", "r2", "r3"], [], held, {}, max_imbalance=4, rng=random.Random(0))
    assert len(plain) == 1 and len(plain[0]) == 2


def test_the_ingress_side_imports_no_torch():
    """The catalog, schema and service checks run in the Ingress, which starts without torch."""
    code = (
        "import sys, serve.lora, serve.lora.catalog, serve.api.schemas, serve.api.service\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "print(heavy[:5]); sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_bench_draws_one_adapter_per_request_seeded():
    from bench.schedule import Workload

    plain = Workload(seed=3)
    mixed = Workload(seed=3, loras=("a", "b", "c", "d"), lora_scale=0.5)
    bodies = [mixed.body(i) for i in range(64)]
    assert [b["loras"][0]["scale"] for b in bodies] == [0.5] * 64
    names = [b["loras"][0]["name"] for b in bodies]
    assert set(names) == {"a", "b", "c", "d"} and names == [mixed.body(i)["loras"][0]["name"] for i in range(64)]
    # Prompts and seeds are those of the same workload without adapters.
    assert [{k: v for k, v in b.items() if k != "loras"} for b in bodies] == [plain.body(i) for i in range(64)]
    assert "loras" not in plain.body(0)


def test_bench_metrics_adapter_cache_hit_rate():
    from bench.metrics import RequestRecord, compute_metrics

    def rec(i, hits, misses, status=200):
        return RequestRecord(i, 0.0, 0.0, 1.0, status, 1, None, {"lora_hits": hits, "lora_misses": misses})

    m = compute_metrics([rec(0, 0, 1), rec(1, 1, 0), rec(2, 1, 0), rec(3, 0, 1, status=500)], 2.0, None)
    assert m.lora_cache_hit_rate == 2 / 3 and m.lora_loads == 1  # failed requests do not count
    assert compute_metrics([RequestRecord(0, 0.0, 0.0, 1.0, 200, 1)], 1.0, None).lora_cache_hit_rate is None


def test_bench_summary_shows_adapters_next_to_the_same_load_without():
    from bench.core import BenchConfig, BenchResult, LevelResult, TargetRun, TargetSpec
    from bench.metrics import RequestRecord, compute_metrics
    from bench.report import summary_markdown
    from bench.runner import Level

    specs = (
        TargetSpec("mixed", url="u1"),
        TargetSpec("mixed +loras", url="u1", loras=True),
        TargetSpec("grouped", url="u2"),
        TargetSpec("grouped +loras", url="u2", loras=True),
    )
    level = Level("closed", 8)
    per_s = {"mixed": 10, "mixed +loras": 9, "grouped": 10, "grouped +loras": 5}
    runs = {}
    for name, n in per_s.items():
        timings = {"lora_hits": 1.0, "lora_misses": 0.0} if "+loras" in name else {}
        records = [RequestRecord(i, 0.0, 0.0, 1.0, 200, 1, None, timings) for i in range(n)]
        runs[name] = [TargetRun(name, level, "now", compute_metrics(records, 1.0, None), records)]  # one round
    config = BenchConfig(targets=specs, levels=(level,), loras=("a", "b"))
    text = summary_markdown(
        BenchResult(config, {}, {s.name: {"url": s.url} for s in specs}, [LevelResult(level, runs, {})])
    )
    assert "## LoRA adapters (+loras: one of a, b per request, seeded)" in text
    assert "| c=8 | mixed +loras | 9.000 | 1000 | 1000 | 1.00 | 0 | 0.90x |" in text
    assert "`mixed +loras` over `grouped +loras` (img/s): c=8 1.80x" in text


def test_stacked_or_segmented_by_cost():
    from serve.lora.apply import LAUNCH_FLOPS, prefer_stacked

    tiny = dict(rows=16, tokens=16, fan=128, launch_flops=LAUNCH_FLOPS["cpu"])
    assert prefer_stacked([2, 2, 2, 2], [4, 4, 4, 4], [4, 4, 4, 4], **tiny)  # launches dominate
    big = dict(rows=16, tokens=4096, fan=2560, launch_flops=LAUNCH_FLOPS["cuda"])
    assert not prefer_stacked([2, 2, 2, 2], [4, 4, 4, 4], [64, 64, 64, 64], **big)  # rank work dominates
