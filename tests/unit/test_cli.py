"""``darkroom generate`` and ``darkroom tiny-model`` as a user runs them: the console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from serve.imageio import decode_image
from serve.params import GenerationParams
from tests.conftest import max_level_diff

DARKROOM = shutil.which("darkroom") or ""


def run(*args, cwd=None, env=None, timeout=300):
    cmd = [DARKROOM, *args] if DARKROOM else [sys.executable, "-m", "serve.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_generate_writes_image_matching_diffusers(tiny_model, reference, tmp_path):
    out = tmp_path / "cat.png"
    proc = run(
        "generate",
        "a cat on a roof",
        "--model",
        tiny_model,
        "--seed",
        "42",
        "--steps",
        "5",
        "--scheduler",
        "euler_a",
        "--negative-prompt",
        "blurry",
        "--size",
        "64x48",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed: 42" in proc.stdout
    for stage in ("encode", "denoise", "decode"):
        assert stage in proc.stdout
    p = GenerationParams(
        prompt="a cat on a roof",
        negative_prompt="blurry",
        width=64,
        height=48,
        num_inference_steps=5,
        guidance_scale=7.5,
        seed=42,
        n=1,
        scheduler="euler_a",
        output_format="png",
    )
    got = decode_image(out.read_bytes())
    assert max_level_diff(got[None], reference(p)) <= 3


def test_generate_n_images_naming_and_random_seed(tiny_model, reference, tmp_path):
    out = tmp_path / "many.webp"
    proc = run("generate", "a tower", "--model", tiny_model, "--n", "3", "--steps", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("many-*.webp"))
    assert [f.name for f in files] == ["many-0.webp", "many-1.webp", "many-2.webp"]
    assert not out.exists()
    seed = int(proc.stdout.split("seed: ")[1].split()[0])
    assert 0 <= seed < 2**32
    pixels = [decode_image(f.read_bytes()) for f in files]
    assert not np.array_equal(pixels[0], pixels[1])


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--size", "100x100"], "--size"),
        (["--steps", "0"], "--steps"),
        (["--guidance", "31"], "--guidance"),
        (["--scheduler", "fast"], "--scheduler"),
        (["--n", "11"], "--n"),
        (["--seed", "-1"], "--seed"),
        (["--output", "x.gif"], "--output"),
    ],
)
def test_generate_bad_flags_exit_2_naming_the_flag(tiny_model, args, flag, tmp_path):
    proc = run("generate", "a cat", "--model", tiny_model, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"error: {flag}:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.png"))


def test_missing_model_is_a_clear_error(tmp_path):
    proc = run("generate", "a cat", "--model", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "model" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_model_command(tmp_path):
    proc = run("tiny-model", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_tiny_model_command_family_and_variant(tmp_path):
    proc = run("tiny-model", str(tmp_path / "f"), "--family", "flux", "--variant", "schnell", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    marker = json.loads((tmp_path / "f" / "darkroom_tiny.json").read_text())
    assert marker == {
        "version": marker["version"],
        "seed": 3,
        "family": "flux",
        "variant": "schnell",
        "native_size": [64, 64],
    }
    assert (tmp_path / "f" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    # Only Flux has variants: the error names the flag, and nothing is written.
    proc = run("tiny-model", str(tmp_path / "x"), "--family", "sdxl", "--variant", "dev")
    assert proc.returncode == 2 and "--variant" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_every_flag_of_every_subcommand_has_help():
    """Walk the whole argparse tree: a flag (or positional) without help text fails here."""
    import argparse

    from serve.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(build_parser(), ["darkroom"])
    assert missing == []


def test_scheduler_names_as_users_type_them():
    from serve.schedulers import FLOW_SCHEDULERS, UNET_SCHEDULERS, scheduler_name

    assert scheduler_name("PNDMScheduler") == "pndm"
    assert {scheduler_name(cls): name for name, cls in UNET_SCHEDULERS.items()} == {n: n for n in UNET_SCHEDULERS}
    assert scheduler_name("FlowMatchEulerDiscreteScheduler") is None
    assert scheduler_name("FlowMatchEulerDiscreteScheduler", FLOW_SCHEDULERS) == "euler"


def test_generate_output_is_one_line_per_event_without_repeats(tiny_model, tmp_path):
    """The model's own scheduler prints as users type it, and a third-party warning raised by
    each stage's load ("`accelerate` was not found") shows at most once, on one line."""
    proc = run("generate", "a hut", "--model", tiny_model, "--steps", "1", "--size", "32x32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "scheduler pndm," in proc.stderr and "PNDMScheduler" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(set(lines)), proc.stderr
    assert sum("accelerate" in line for line in lines) <= 1
    assert not any(line.strip() in ("```", ".") for line in lines), proc.stderr
