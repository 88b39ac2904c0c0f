import sys

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

torch.set_num_threads(1)
m = sys.argv[1]
unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet").float().eval()
te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder").eval()
tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer")
ns = DDPMScheduler.from_pretrained(m, subfolder="scheduler")


def enc(caps):
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids)[0]


g = torch.Generator().manual_seed(0)
noise = torch.randn(1, 4, 16, 16, generator=g).repeat(4, 1, 1, 1)
shapes = ["circle", "square", "triangle", "star"]
colours = ["red", "blue", "green", "yellow"]
for t in (950, 800, 600, 400):
    tt = torch.full((4,), t)
    ac = ns.alphas_cumprod[t]
    out = {}
    for name, caps in (
        ("shape", [f"a large red {s} in the center, black background" for s in shapes]),
        ("colour", [f"a large {c} circle in the center, black background" for c in colours]),
    ):
        with torch.no_grad():
            v = unet(noise, tt, enc(caps)).sample
        x0 = ac.sqrt() * noise - (1 - ac).sqrt() * v
        d = (x0[:, None] - x0[None]).pow(2).mean(dim=(2, 3, 4)).sqrt()
        out[name] = d.sum().item() / 12
    print(t, {k: round(v, 4) for k, v in out.items()})
