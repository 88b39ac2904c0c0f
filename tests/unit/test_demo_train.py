"""`darkroom train-demo` on a toy budget: it writes a loadable SD model, and an interrupted run
resumes from its checkpoint to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from serve.demo.train import TrainConfig, train_demo
from serve.errors import DarkroomError
from tests.unit.test_cli import run

# A few steps of every phase, a checkpoint every other step.
TOY = dict(
    vae_steps=3, vae_batch_size=2, dataset_size=6, unet_steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2
)


def _weights(model_dir):
    return {name: load_file(model_dir / name / "diffusion_pytorch_model.safetensors") for name in ("unet", "vae")} | {
        "text_encoder": load_file(model_dir / "text_encoder" / "model.safetensors")
    }


def _same(a, b) -> bool:
    return all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_demo(tmp_path_factory.mktemp("train") / "run", TrainConfig(**TOY))


def test_writes_a_stable_diffusion_pipeline(uninterrupted):
    from diffusers import StableDiffusionPipeline

    from serve.model import read_model_info

    info = read_model_info(uninterrupted)
    assert info.name == "darkroom-demo"
    # A request that names no guidance gets the model's (SD's 7.5 over-guides it), steps SD's.
    from serve.demo.model import DEFAULT_GUIDANCE
    from serve.families import family_of

    assert info.default_guidance == DEFAULT_GUIDANCE != 7.5
    assert family_of(info).request_defaults() == {"guidance_scale": DEFAULT_GUIDANCE, "num_inference_steps": 50}
    assert info.native_size == (64, 64) and info.vae_scale_factor == 4
    assert info.vae_scaling_factor != 0.18215  # measured on the encoded data set
    marker = json.loads((uninterrupted / "darkroom_demo.json").read_text())
    assert marker["train"]["unet_steps"] == TOY["unet_steps"]
    pipe = StableDiffusionPipeline.from_pretrained(uninterrupted, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_ddim_request_does_not_clip_the_demo_latents(uninterrupted):
    """SD's scheduler config says clip_sample: false; PNDM ignores the key, DDIM (default True)
    would clip the predicted latents to [-1, 1] when a request asks for it by name."""
    from serve.schedulers import make_scheduler

    saved = json.loads((uninterrupted / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PNDMScheduler" and saved["clip_sample"] is False
    ddim = make_scheduler("ddim", saved, "PNDMScheduler")
    assert ddim.config.clip_sample is False and ddim.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("phase, at", [("vae", 2), ("unet", 3)])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, uninterrupted, phase, at):
    def stop(p, done, total, metrics):
        if p == phase and done == at:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_demo(out, TrainConfig(**TOY), progress=stop)
    saved = torch.load(out / "checkpoints" / f"{phase}.pt", weights_only=False)
    assert saved["step"] == at  # the checkpoint taken on Ctrl-C, between regular ones
    assert not (out / "model").exists()
    seen = []
    resumed = train_demo(out, TrainConfig(**TOY), progress=lambda p, d, t, m: seen.append((p, d)))
    assert (phase, at) not in seen and (phase, at + 1) in seen  # it did not start over
    assert _same(_weights(resumed), _weights(uninterrupted))


def test_foreground_masks_cover_the_shapes_only(tmp_path):
    from serve.demo.data import Scene
    from serve.demo.train import Trainer

    left = Scene("red", "square", "left", "blue", "large", 1, (0, 0), "")
    top = Scene("red", "circle", "top", "blue", "small", 1, (0, 0), "")
    masks = Trainer(tmp_path / "run", TrainConfig(**TOY)).foreground_masks([left, top])
    assert masks.shape == (2, 1, 16, 16)
    # A large square at the left (centre x 18 px, half-side 12 px: x 6..30, y 20..44 -> cells 1..7, 5..11).
    rows, cols = torch.nonzero(masks[0, 0], as_tuple=True)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (1, 7, 5, 10)
    assert not masks[0, 0, :, 9:].any() and masks[1, 0, 3:6, 7:9].all() and not masks[1, 0, 9:].any()


def test_foreground_weight_changes_the_training(tmp_path, uninterrupted):
    weighted = train_demo(tmp_path / "run", TrainConfig(**TOY, unet_foreground_weight=10.0))
    a, b = _weights(weighted), _weights(uninterrupted)
    assert all(torch.equal(a["vae"][k], b["vae"][k]) for k in a["vae"])  # the VAE does not use it
    assert not _same({"unet": a["unet"]}, {"unet": b["unet"]})


def test_default_unet_options_and_the_plain_sd_unet(tmp_path, uninterrupted):
    """The defaults (text-time embedding, 48 channels at 16x16, high-noise timesteps) and the
    plain SD UNet they replace both write a pipeline that diffusers loads and runs unchanged."""
    from diffusers import StableDiffusionPipeline

    defaults = TrainConfig()
    assert defaults.unet_text_time_embedding and defaults.unet_channels == (48, 64, 64)
    assert defaults.timestep_sampling == "high"
    config = json.loads((uninterrupted / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] == "text" and config["block_out_channels"] == [48, 64, 64]
    assert any(k.startswith("add_embedding.") for k in _weights(uninterrupted)["unet"])
    pipe = StableDiffusionPipeline.from_pretrained(uninterrupted, safety_checker=None)
    assert pipe.unet.config.addition_embed_type == "text"  # not dropped on load
    plain = dict(unet_text_time_embedding=False, unet_channels=(32, 64, 64), timestep_sampling="uniform")
    out = train_demo(tmp_path / "run", TrainConfig(**TOY, **plain))
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] is None and config["block_out_channels"] == [32, 64, 64]
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images[0].shape == (64, 64, 3)
    uniform = train_demo(tmp_path / "uniform", TrainConfig(**TOY, timestep_sampling="uniform"))
    assert not _same({"unet": _weights(uniform)["unet"]}, {"unet": _weights(uninterrupted)["unet"]})
    with pytest.raises(ValueError, match="timestep_sampling"):
        TrainConfig(timestep_sampling="low")


def test_resume_refuses_another_configuration(tmp_path):
    out = tmp_path / "run"
    train_demo(out, TrainConfig(**{**TOY, "unet_steps": 0, "vae_steps": 1}))
    with pytest.raises(DarkroomError, match="another configuration"):
        train_demo(out, TrainConfig(**{**TOY, "unet_steps": 0, "vae_steps": 2}))


def test_cli_trains_and_names_bad_flags(tmp_path):
    out = tmp_path / "cli-run"
    args = ["--vae-steps", "1", "--unet-steps", "2", "--dataset-size", "4", "--batch-size", "2", "--threads", "1"]
    proc = run("train-demo", str(out), *args, "--no-unet-text-time-embedding", "--unet-channels", "32,64,64")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "model" / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] is None and config["block_out_channels"] == [32, 64, 64]
    assert "wrote demo model to" in proc.stdout and "s CPU" in proc.stdout
    assert "unet: 2/2" in proc.stderr  # progress goes to stderr
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for bad, flag in ((["--unet-steps", "-1"], "--unet-steps"), (["--batch-size", "0"], "--batch-size")):
        proc = run("train-demo", str(tmp_path / "bad"), *bad)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and flag in proc.stderr, proc.stderr
