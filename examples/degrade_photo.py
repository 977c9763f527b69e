"""The LR of one photo as each --degradation makes it: lr_nn.png, lr_bicubic.png,
lr_realesrgan.png.  python examples/degrade_photo.py photo.jpg"""
import sys

import numpy as np
import torch
from PIL import Image

from srdata.degrade import make_lr
from srdata.degrade_params import sample_params

photo = np.array(Image.open(sys.argv[1]).convert("RGB"))
h, w = photo.shape[0] // 4 * 4, photo.shape[1] // 4 * 4      # sides divisible by the scale
hr = torch.from_numpy(photo[:h, :w]).permute(2, 0, 1)[None]  # uint8, NCHW
params = sample_params(np.random.default_rng(0), n=1)        # one sample's blur, noise, JPEG
for kind in ("nn", "bicubic", "realesrgan"):
    lr = make_lr(hr, 4, kind, params)                        # uint8, (1, 3, h/4, w/4)
    Image.fromarray(lr[0].permute(1, 2, 0).numpy()).save(f"lr_{kind}.png")
    print(f"lr_{kind}.png", tuple(lr.shape[2:]))
