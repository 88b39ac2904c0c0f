# Time a UNet+text-encoder training step: 1 process x 2 threads (batch 32) vs 2 DDP processes x 1 thread
# (batch 16 each).
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, ".")  # run from the repository root
from serve.demo.model import build_text_encoder, build_tokenizer, build_unet

CH = tuple(int(c) for c in os.environ.get("CH", "32,64,64").split(","))


def step_fn(unet, te, opt, params, b, ids):
    x = torch.randn(b, 4, 16, 16)
    t = torch.randint(0, 1000, (b,))
    h = te(ids[:b])[0]
    loss = (unet(x, t, h).sample - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def run(rank, world, n, q):
    torch.set_num_threads(2 if world == 1 else 1)
    torch.manual_seed(0)
    tok = build_tokenizer()
    unet = build_unet(True, CH)
    te = build_text_encoder(tok)
    ids = tok(
        ["a red circle on a blue background"] * 32,
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids
    if world > 1:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=world)
        unet = torch.nn.parallel.DistributedDataParallel(unet)
        te = torch.nn.parallel.DistributedDataParallel(te)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, 1e-4)
    b = 32 // world
    for _ in range(5):
        step_fn(unet, te, opt, params, b, ids)
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn(unet, te, opt, params, b, ids)
    dt = (time.perf_counter() - t0) / n
    if rank == 0:
        q.put(dt)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    ctx = mp.get_context("spawn")
    for world in (1, 2, 1, 2):
        q = ctx.Queue()
        ps = [ctx.Process(target=run, args=(r, world, n, q)) for r in range(world)]
        [p.start() for p in ps]
        dt = q.get()
        [p.join() for p in ps]
        print(f"channels {CH} world {world}: {dt * 1000:.0f} ms/step (batch 32 total)", flush=True)
