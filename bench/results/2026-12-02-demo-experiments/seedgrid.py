import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from serve.demo.checker import read_scene

torch.set_num_threads(1)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None)
pipe.set_progress_bar_config(disable=True)
shapes = ["circle", "square", "triangle", "star"]
rows = []
reads = []
for seed in range(6):
    row = []
    for s in shapes:
        g = torch.Generator().manual_seed(seed)
        im = pipe(
            f"a large red {s} in the center, black background",
            num_inference_steps=20,
            guidance_scale=3,
            generator=g,
            output_type="np",
        ).images[0]
        im = (im * 255).round().astype(np.uint8)
        row.append(im)
        reads.append((s, read_scene(im).shape))
    rows.append(np.concatenate(row, 1))
Image.fromarray(np.concatenate(rows, 0)).resize((256 * 2, 384 * 2), Image.NEAREST).save(sys.argv[2])
print(sum(a == b for a, b in reads), "/", len(reads), reads)
