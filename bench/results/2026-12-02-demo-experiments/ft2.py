"""usage: ft2.py MODE STEPS LR DEST: fine-tune /tmp/demo/full's EMA weights; MODE uniform|hi (p(t) ~ t)."""

import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from serve.demo.model import build_scheduler, build_text_encoder, build_unet
from serve.demo.train import _DATASET, TrainConfig, Trainer, training_scene

torch.set_num_threads(1)
mode, steps, lr, dest = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
tmp = Path(f"/tmp/d3/run-{mode}-{steps}")
shutil.rmtree(tmp, ignore_errors=True)
(tmp / "checkpoints").mkdir(parents=True)
tr = Trainer(tmp, TrainConfig())
lat = torch.load("/tmp/demo/full/checkpoints/latents.pt", weights_only=False)
mean, std, sf = lat["mean"], lat["std"], lat["scaling_factor"]
scenes = [training_scene(0 * 10 + _DATASET, i) for i in range(mean.shape[0])]
st = torch.load("/tmp/demo/full/checkpoints/unet.pt", weights_only=False)
unet = build_unet()
te = build_text_encoder(tr.tokenizer)
params = list(unet.parameters()) + list(te.parameters())
for p, s in zip(params, st["ema"]["shadow_params"], strict=True):
    p.data.copy_(s)
ema = EMAModel(params, decay=0.995)
ns = DDPMScheduler.from_config(build_scheduler().config)
opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
unet.train()
te.train()
t0 = time.time()
for step in range(steps):
    g = torch.Generator().manual_seed(99_000 + step)
    idx = torch.randint(0, mean.shape[0], (32,), generator=g)
    latents = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g)) * sf
    noise = torch.randn(latents.shape, generator=g) + 0.1 * torch.randn((*latents.shape[:2], 1, 1), generator=g)
    u = torch.rand(32, generator=g)
    t = (1000 * (u.sqrt() if mode == "hi" else u)).long().clamp(max=999)
    ids = tr._token_ids(tr._captions([scenes[i] for i in idx.tolist()], 50_000 + step))
    pred = unet(ns.add_noise(latents, noise, t), t, te(ids)[0]).sample
    err = F.mse_loss(pred, ns.get_velocity(latents, noise, t), reduction="none")
    snr = compute_snr(ns, t)
    loss = (err.mean(dim=(1, 2, 3)) * torch.clamp(snr + 1, max=5.0) / (snr + 1)).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.step(params)
    if step % 100 == 0:
        print(step, round(loss.item(), 4), round(time.time() - t0), flush=True)
ema.copy_to(params)
shutil.rmtree(dest, ignore_errors=True)
shutil.copytree("/tmp/demo/full/model", dest)
unet.eval().to(torch.float16).save_pretrained(dest / "unet")
te.eval().save_pretrained(dest / "text_encoder")
print("saved", round(time.time() - t0))
