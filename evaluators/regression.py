"""The ``masks`` task: dense prediction, a worked example of a task with its own metrics and loss.

Each sample is a procedural grey image of ``size`` x ``size`` pixels: noise, a random
brightness offset, one *filled* shape (a disc or a rectangle) and one *hollow* rectangle of
the same brightness (a distractor). The target is the filled shape's mask: telling the two
apart needs context, not a pixel threshold. The model (:class:`MaskNet`) is fully
convolutional (three conv-BN-ReLU stages, the last one dilated, and a 1x1 conv to one
logit per pixel), trained once with binary cross-entropy and cached.

The task scores a model by ``iou`` (intersection over union of the predicted mask, logits
> 0, with the true one, over the whole validation set; maximised) and ``mse`` (mean squared
error of the predicted probabilities; minimised), trains it (fine-tune, gradient-based
criteria) with BCE, and distils with a temperature-scaled binary KD. A study names them as
any objective: ``objectives = ["iou", "flops"]``, ``[constraints] max_mse = 0.05``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.batch import Batch, call
from evaluators.metrics import MAXIMIZE, MINIMIZE
from evaluators.task_training import check_option, check_split, check_widths, task_options, trained_task
from evaluators.tasks import Task, register_task
from spaces.checks import check_int, check_number

Tensor = torch.Tensor
MASK_METRICS = {"iou": MAXIMIZE, "mse": MINIMIZE}

_MASKS_VERSION = 1  # bump when the generator, architecture or training changes
MASKS_DEFAULTS: dict = {
    "seed": 0,
    "n_samples": 1200,       # 840 train / 120 calibration / 240 validation
    "size": 16,
    "widths": [8, 16, 16],
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.05,
    "split": [0.7, 0.1, 0.2],
}


# -- data ------------------------------------------------------------------------------------
def _rand(gen: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=gen))


def _filled(size: int, gen: torch.Generator) -> Tensor:
    """A filled disc or rectangle at a random place (bool [size, size])."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = functools.partial(_rand, gen)
    if r(0, 2):
        radius = r(2, max(3, size // 4))
        cy, cx = r(radius, size - radius), r(radius, size - radius)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    h, w = r(3, size // 2), r(3, size // 2)
    top, left = r(0, size - h), r(0, size - w)
    return (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)


def _outline(size: int, gen: torch.Generator) -> Tensor:
    """The one-pixel outline of a random rectangle (bool [size, size])."""
    r = functools.partial(_rand, gen)
    h, w = r(4, size // 2 + 1), r(4, size // 2 + 1)
    top, left = r(0, size - h), r(0, size - w)
    box = torch.zeros(size, size, dtype=torch.bool)
    box[top:top + h, left:left + w] = True
    box[top + 1:top + h - 1, left + 1:left + w - 1] = False
    return box


def generate_masks(n: int, *, seed: int = 0, size: int = 16) -> tuple[Tensor, Tensor]:
    """``n`` images ``x: float [n, 1, size, size]`` and their masks ``y`` (same shape, 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=gen) * 0.3
    y = torch.zeros(n, 1, size, size)
    for i in range(n):
        target, distractor = _filled(size, gen), _outline(size, gen)
        x[i, 0] += float(torch.rand(1, generator=gen)) - 0.5 + (target | distractor).float()
        y[i, 0] = target.float()
    return x, y


# -- model -----------------------------------------------------------------------------------
def _stage(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MaskNet(nn.Module):
    """Fully convolutional: one logit per pixel, (batch, 1, H, W)."""

    def __init__(self, widths: Sequence[int] = (8, 16, 16)):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(_stage(1, a), _stage(a, b), _stage(b, c, dilation=2))
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_mask_model(widths: tuple[int, int, int]) -> nn.Module:
    return MaskNet(widths)


# -- scoring (module-level: workers unpickle them with the task) ------------------------------
def mask_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of the per-pixel logits."""
    return F.binary_cross_entropy_with_logits(logits, target)


def mask_distill(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Binary KD: BCE of the student's tempered logits against the teacher's tempered
    probabilities, times T^2 (the gradient scale of Hinton's KD)."""
    t = temperature
    return F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t


def mask_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """``iou`` over every validation pixel (predicted: logit > 0) and ``mse`` of the probabilities."""
    inter = union = 0.0
    sq, count = 0.0, 0
    for x, y in batches:
        logits = call(model, x)
        pred, truth = logits > 0, y > 0.5
        inter += float((pred & truth).sum())
        union += float((pred | truth).sum())
        sq += float(((torch.sigmoid(logits) - y) ** 2).sum())
        count += y.numel()
    return {"iou": inter / union if union else 1.0, "mse": sq / count}


# -- task ------------------------------------------------------------------------------------
def masks_options(options: Mapping) -> dict:
    """``options`` merged over the defaults and validated (one-line ``ValueError`` naming the option)."""
    opts = task_options("masks", options, MASKS_DEFAULTS)
    for key, low in {"seed": 0, "n_samples": 10, "size": 10, "epochs": 1, "batch_size": 1}.items():
        check_option("masks", key, opts[key], check_int, low, wanted=f"an integer >= {low}")
    return {**opts, "widths": check_widths("masks", opts["widths"]), "split": check_split("masks", opts["split"]),
            "lr": check_number("masks option lr", opts["lr"], positive=True)}


@register_task("masks", metrics=MASK_METRICS)
def masks_task(options: dict, cache_dir: Path) -> Task:
    """Procedural mask prediction (see module docstring), trained once and cached."""
    opts = masks_options(options)
    config = {"task": "masks", "version": _MASKS_VERSION, **opts}
    x, y = generate_masks(opts["n_samples"], seed=opts["seed"], size=opts["size"])
    build = functools.partial(build_mask_model, tuple(opts["widths"]))
    return trained_task("masks", x, y, build=build, num_classes=1, opts=opts, config=config, cache_dir=cache_dir,
                        metrics=mask_metrics, metric_directions=dict(MASK_METRICS), loss=mask_loss,
                        distill=mask_distill)

