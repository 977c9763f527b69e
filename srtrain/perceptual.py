"""The perceptual loss: L1 between VGG19 features of the output and of the target.

The VGG19 convolutions are laid out as torchvision's ``vgg19().features`` (the same
``features.N`` indices), so its ImageNet weights ``vgg19-dcbb9e9d.pth`` load without
torchvision. Features are taken before the ReLU (BasicSR's ``conv1_2`` .. ``conv5_4``
names) from ImageNet-normalised [0, 1] RGB, as Real-ESRGAN's ``PerceptualLoss``.
The weights are never downloaded here: a missing file is one clear error.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_error

VGG_FILE = "vgg19-dcbb9e9d.pth"
VGG_URL = f"https://download.pytorch.org/models/{VGG_FILE}"
# where BasicSR keeps it, relative to the folder training runs in
BASICSR_VGG = Path("experiments") / "pretrained_models" / VGG_FILE

# VGG19's five blocks: (channels, convolutions); a 2x2 max pool ends each block
VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
# Real-ESRGAN x4plus: pre-ReLU features and their weights
PERCEPTUAL_LAYERS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0,
                     "conv5_4": 1.0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsMissing(ValueError):
    """VGG19's weights are not where they were looked for; the message says what to do."""


def vgg19_layers() -> tuple[list[str], list[nn.Module]]:
    """VGG19's feature layers in torchvision's order and BasicSR's names for them."""
    names, layers, c_in = [], [], 3
    for b, (width, convs) in enumerate(VGG19_BLOCKS, 1):
        for j in range(1, convs + 1):
            names += [f"conv{b}_{j}", f"relu{b}_{j}"]
            # not in place: a pre-ReLU feature is the convolution's output itself
            layers += [nn.Conv2d(c_in, width, 3, 1, 1), nn.ReLU()]
            c_in = width
        names.append(f"pool{b}")
        layers.append(nn.MaxPool2d(2, 2))
    return names, layers


class VGGFeatures(nn.Module):
    """VGG19 up to the deepest of ``layers``; ``forward`` maps a [0, 1] RGB batch to
    {layer name: pre-activation feature map}. Frozen: no gradients into its weights."""

    def __init__(self, layers=tuple(PERCEPTUAL_LAYERS)):
        super().__init__()
        names, modules = vgg19_layers()
        unknown = [n for n in layers if n not in names]
        if unknown or not layers:
            raise ValueError(f"got VGG19 layers {list(layers)}, expected names among "
                             f"{', '.join(n for n in names if n.startswith('conv'))}")
        self.layers = {names.index(n): n for n in layers}
        self.features = nn.Sequential(*modules[:max(self.layers) + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out[self.layers[i]] = x
        return out


class PerceptualLoss(nn.Module):
    """``weight`` x the sum over layers of layer weight x mean |VGG(sr) - VGG(gt)|."""

    def __init__(self, vgg: VGGFeatures, weight: float = 1.0,
                 layer_weights: dict[str, float] = PERCEPTUAL_LAYERS):
        super().__init__()
        missing = [n for n in layer_weights if n not in vgg.layers.values()]
        assert not missing, f"VGGFeatures built without {missing}"
        self.vgg, self.weight, self.layer_weights = vgg, weight, dict(layer_weights)

    def forward(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.vgg(gt)
        got = self.vgg(sr)
        loss = sum(w * F.l1_loss(got[n].float(), target[n].float())
                   for n, w in self.layer_weights.items())
        return self.weight * loss


def vgg_search_paths() -> list[Path]:
    """Where VGG19's weights are looked for without --vgg-weights: torchvision's download
    cache, then BasicSR's pretrained-models folder under the current folder."""
    return [Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE, Path.cwd() / BASICSR_VGG]


def find_vgg_weights(path: str | os.PathLike | None = None) -> Path:
    """The VGG19 weight file: ``path`` if given, else the first of vgg_search_paths()."""
    if path is not None:
        if not Path(path).is_file():
            raise VGGWeightsMissing(f"--vgg-weights {path}: no such file; give the path of "
                                    f"{VGG_FILE} (from {VGG_URL})")
        return Path(path)
    places = vgg_search_paths()
    for place in places:
        if place.is_file():
            return place
    raise VGGWeightsMissing(
        f"the perceptual loss needs VGG19's ImageNet weights {VGG_FILE} (548 MB, from "
        f"{VGG_URL}); not found in {places[0].parent} or {places[1].parent}: download it "
        "there or pass --vgg-weights PATH, or train without it with --perceptual-weight 0")


def load_vgg19(path: str | os.PathLike | None = None,
               layers=tuple(PERCEPTUAL_LAYERS)) -> VGGFeatures:
    """VGGFeatures for ``layers`` with the weights of ``path`` (found by find_vgg_weights):
    torchvision's whole VGG19 state dict, its ``features.*`` tensors, or
    ``vgg19().features.state_dict()`` (keys without the prefix)."""
    path = find_vgg_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and OS errors all mean: not loadable weights
        raise ValueError(f"cannot read VGG19 weights from {path}: "
                         f"{load_error(e) or type(e).__name__}") from None
    vgg = VGGFeatures(layers)
    vgg.features.load_state_dict(_features(state, vgg, path))
    return vgg


def _features(state, vgg: VGGFeatures, path: Path) -> dict:
    """The tensors of ``state`` that VGGFeatures' convolutions take, checked for shape."""
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not VGG19's state dict")
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items()
                 if k.startswith("features.")}
    own = vgg.features.state_dict()
    for key, want in own.items():
        got = state.get(key)
        if not torch.is_tensor(got) or got.shape != want.shape:
            have = "missing" if got is None else f"shape {tuple(getattr(got, 'shape', ()))}"
            raise ValueError(f"{path} is not torchvision's VGG19 ({VGG_FILE}): features."
                             f"{key} is {have}, expected shape {tuple(want.shape)}")
    return {k: state[k] for k in own}
