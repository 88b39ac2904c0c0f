# Export the EMA weights of a run's UNet checkpoint as a model folder (to evaluate mid-run).
import sys
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from serve.demo.model import build_text_encoder, build_unet, build_vae
from serve.demo.train import TrainConfig, Trainer

torch.set_num_threads(1)
run, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = TrainConfig.model_validate_json((run / "train_config.json").read_text())
tr = Trainer(out, cfg)
st = torch.load(run / "checkpoints" / "unet.pt", weights_only=False)
lat = torch.load(run / "checkpoints" / "latents.pt", weights_only=False)
unet = build_unet(cfg.unet_text_time_embedding, cfg.unet_channels)
te = build_text_encoder(tr.tokenizer)
unet.load_state_dict(st["unet"])
te.load_state_dict(st["text_encoder"])
params = list(unet.parameters()) + list(te.parameters())
ema = EMAModel(params)
ema.load_state_dict(st["ema"])
ema.copy_to(params)
vae = build_vae()
v = torch.load(run / "checkpoints" / "vae.pt", weights_only=False)
vae.load_state_dict(v["vae"])
vae.register_to_config(scaling_factor=lat["scaling_factor"])
print("step", st["step"], tr.export(vae.eval(), unet.eval(), te.eval()))
