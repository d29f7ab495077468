"""``digits``: scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16, a fixed
seeded 60/15/25 train/calibration/validation split and a small CNN with residual and
depthwise (MobileNet-style) blocks, trained on CPU on first use and cached under
``cache_dir`` in a file named by a hash of the task config."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.blocks import InvertedResidual, ResidualBlock, conv_bn
from evaluators.task_training import check_option, check_split, check_widths, task_options, trained_task
from evaluators.tasks import Task, register_task
from spaces.checks import check_int

Tensor = torch.Tensor


class DigitsNet(nn.Module):
    """Small CNN for 1x16x16 digits: stem, 2 residual stages, a depthwise block, a head."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), num_classes: int = 10):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = conv_bn(1, w1)
        self.block1 = ResidualBlock(w1, w1)
        self.block2 = ResidualBlock(w1, w2, stride=2)
        self.block3 = InvertedResidual(w2, expand=2)
        self.block4 = ResidualBlock(w2, w3, stride=2)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block4(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_digits_model(widths: tuple[int, int, int] = (24, 48, 96), num_classes: int = 10) -> nn.Module:
    """Module-level factory so ``functools.partial(build_digits_model, ...)`` pickles for Ray."""
    return DigitsNet(tuple(widths), num_classes)


_DIGITS_VERSION = 1  # bump when the architecture, data pipeline or training changes
_DIGITS_DEFAULTS = {
    "seed": 0,
    "image_size": 16,
    "widths": [24, 48, 96],  # narrower nets lose most accuracy at 50% uniform pruning
    "epochs": 10,
    "batch_size": 64,
    "lr": 0.05,
    "split": [0.6, 0.15, 0.25],
}


def _shift_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random circular shift by up to 1 pixel, drawn from ``gen`` (digit borders are background)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _digits_data(image_size: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: no download
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    return x.contiguous(), torch.tensor(digits.target, dtype=torch.long)


def digits_options(options: dict) -> dict:
    """``options`` merged over the defaults and validated (one-line ``ValueError`` naming the option)."""
    opts = task_options("digits", options, _DIGITS_DEFAULTS)
    for key in ("seed", "image_size", "epochs", "batch_size"):
        check_option("digits", key, opts[key], check_int, 0 if key == "seed" else 1, wanted="a positive integer")
    return {**opts, "widths": check_widths("digits", opts["widths"]), "split": check_split("digits", opts["split"])}


@register_task("digits")
def digits_task(options: dict, cache_dir: Path) -> Task:
    """scikit-learn digits with a small residual + depthwise CNN (trained once, cached)."""
    opts = digits_options(options)
    widths = tuple(int(w) for w in opts["widths"])
    config = {"task": "digits", "version": _DIGITS_VERSION, **opts, "widths": list(widths), "split": list(opts["split"])}
    x, y = _digits_data(opts["image_size"])
    build = functools.partial(build_digits_model, widths, 10)
    return trained_task("digits", x, y, build=build, num_classes=10, opts=opts, config=config,
                        cache_dir=cache_dir, augment=_shift_augment)
