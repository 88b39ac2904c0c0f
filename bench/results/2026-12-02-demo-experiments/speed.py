# Relative speed of one UNet+text-encoder training step under CPU variants (interleaved rounds).
import os
import sys
import time

import torch

sys.path.insert(0, ".")  # run from the repository root
from serve.demo.model import build_text_encoder, build_tokenizer, build_unet

torch.set_num_threads(int(os.environ.get("T", "2")))
torch.manual_seed(0)
CH = tuple(int(c) for c in os.environ.get("CH", "32,64,64").split(","))
tok = build_tokenizer()
ids = tok(
    ["a red circle on a blue background"] * 32, padding="max_length", max_length=77, return_tensors="pt"
).input_ids
x = torch.randn(32, 4, 16, 16)
t = torch.randint(0, 1000, (32,))


def make(variant):
    torch.manual_seed(0)
    unet = build_unet(True, CH)
    te = build_text_encoder(tok)
    if "cl" in variant:
        unet = unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, 1e-4)

    def fwd(xx, tt, hh):
        return unet(xx, tt, hh).sample

    if "compile" in variant:
        fwd = torch.compile(fwd)
    bf = "bf16" in variant
    xx = x.to(memory_format=torch.channels_last) if "cl" in variant else x

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf):
            h = te(ids)[0]
            out = fwd(xx, t, h)
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


variants = sys.argv[1:] or ["eager", "cl", "bf16", "compile", "compile_bf16"]
steps = {}
for v in variants:
    t0 = time.perf_counter()
    steps[v] = make(v)
    for _ in range(3):
        steps[v]()
    print(f"{v}: warm-up {time.perf_counter() - t0:.0f} s", flush=True)
res = {v: [] for v in variants}
for _r in range(3):
    for v in variants:
        t0 = time.perf_counter()
        for _ in range(8):
            steps[v]()
        res[v].append((time.perf_counter() - t0) / 8)
base = min(res[variants[0]])
for v in variants:
    print(f"{v}: {min(res[v]) * 1000:.0f} ms/step  ({base / min(res[v]):.2f}x vs {variants[0]})", flush=True)
