import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from serve.demo.checker import read_scene, score
from serve.demo.data import evaluation_scenes, render

torch.set_num_threads(1)
m = sys.argv[1]
vae = AutoencoderKL.from_pretrained(m, subfolder="vae").float().eval()
sf = vae.config.scaling_factor
scenes = evaluation_scenes(100)
x = torch.from_numpy(np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


def dec(z):
    with torch.no_grad():
        y = vae.decode(z / sf).sample
    imgs = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return score([read_scene(i) for i in imgs], scenes)


with torch.no_grad():
    z0 = vae.encode(x).latent_dist.mean * sf
g = torch.Generator().manual_seed(0)
for s in [0, 0.1, 0.2, 0.3, 0.5]:
    r = dec(z0 + s * torch.randn(z0.shape, generator=g))
    print("perturb", s, {k: round(v, 2) for k, v in r.items() if k in ("colour", "shape", "position")}, flush=True)
# SDEdit: noise true latents to t, one-shot x0 prediction by the UNet with the true caption
unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet").float().eval()
te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder").eval()
tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer")
ns = DDPMScheduler.from_pretrained(m, subfolder="scheduler")
ids = tok(
    [s.caption for s in scenes], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
).input_ids
with torch.no_grad():
    h = te(ids)[0]
ac = ns.alphas_cumprod
for t in [100, 300, 500, 700, 900]:
    tt = torch.full((len(scenes),), t)
    n = torch.randn(z0.shape, generator=g)
    zt = ns.add_noise(z0, n, tt)
    with torch.no_grad():
        v = unet(zt, tt, h).sample
    a, b = ac[t].sqrt(), (1 - ac[t]).sqrt()
    x0 = a * zt - b * v
    r = dec(x0)
    print("x0-pred t", t, {k: round(v, 2) for k, v in r.items() if k in ("colour", "shape", "position")}, flush=True)
