"""``shapes``: a procedural, seeded image-classification task hard enough to rank pruned models.

On ``digits`` nearly every pruned policy recovers its accuracy after a short fine-tune, so
searchers cannot be told apart there. ``shapes`` is generated here from a seed (nothing is
downloaded): 32x32 RGB images whose class is the *kind* of the dominant figure (circle,
square, triangle, cross, ring, star, striped patch, checkered patch, crescent, dotted disc,
hollow frame, half disc), drawn at a random position, scale, rotation and colour over a
gradient-and-blotch background, with fainter, smaller distractor figures of other kinds
on top and additive Gaussian pixel noise. Textured classes need fine, high-frequency
filters while clutter and noise need capacity to ignore, so a narrow (heavily pruned)
network loses accuracy that a short fine-tune does not fully win back.

The model is a CIFAR-style ResNet (stem + 3 stages of BasicBlocks, global pool, linear),
trained once on CPU with :func:`evaluators.task_training.train_classifier` and cached under
``cache_dir`` by the hash of the task config.

Generation is vectorised with torch and deterministic: every random parameter is drawn
from one ``torch.Generator`` seeded with ``seed`` before any rendering, and rendering works
in fixed-size chunks, so the same options always give the same tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.blocks import ResidualBlock, conv_bn
from evaluators.task_training import check_option, check_split, check_widths, option_error, task_options, trained_task
from evaluators.tasks import Task, register_task
from spaces.checks import check_int, check_number

Tensor = torch.Tensor

# -- figures --------------------------------------------------------------------------------
# Each figure is a signed-distance-like function of local coordinates (u, v) (the figure
# spans roughly the unit disc): negative inside, positive outside, in local units. Edges
# are a one-pixel ramp of distance / pixel size, so figures are anti-aliased at any scale.
# Textured figures intersect an outline with a periodic pattern.
Figure = Callable[[Tensor, Tensor], Tensor]

_STRIPE_FREQ = 2 * math.pi / 0.42  # period 0.42 local units: ~2-4 px at the drawn scales
_DOT_PERIOD = 0.5


def _rho(u: Tensor, v: Tensor) -> Tensor:
    return torch.sqrt(u * u + v * v + 1e-12)


def _box(u: Tensor, v: Tensor, half: float) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) - half


def _circle(u: Tensor, v: Tensor) -> Tensor:
    return _rho(u, v) - 0.95


def _square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.78)


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Intersection of three half-planes; inradius 0.5, so the vertices lie on the unit circle.
    sides = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    return torch.stack(sides).amax(0) - 0.5


def _cross(u: Tensor, v: Tensor) -> Tensor:
    bar_h = torch.maximum(u.abs() - 1.0, v.abs() - 0.28)
    bar_v = torch.maximum(v.abs() - 1.0, u.abs() - 0.28)
    return torch.minimum(bar_h, bar_v)


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (_rho(u, v) - 0.72).abs() - 0.24


def _star(u: Tensor, v: Tensor) -> Tensor:
    # Five points: radius swings between 0.3 and 1.0 with the polar angle.
    phi = torch.atan2(v, u)
    return (_rho(u, v) - (0.65 + 0.35 * torch.cos(5 * phi))) * 0.7


def _stripes(u: Tensor, v: Tensor) -> Tensor:
    pattern = -torch.sin(u * _STRIPE_FREQ) / _STRIPE_FREQ
    return torch.maximum(_box(u, v, 0.85), pattern)


def _checker(u: Tensor, v: Tensor) -> Tensor:
    pattern = -torch.sin(u * _STRIPE_FREQ) * torch.sin(v * _STRIPE_FREQ) / _STRIPE_FREQ
    return torch.maximum(_box(u, v, 0.85), pattern)


def _crescent(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(_rho(u, v) - 0.95, 0.8 - _rho(u - 0.5, v))


def _dots(u: Tensor, v: Tensor) -> Tensor:
    du = torch.remainder(u / _DOT_PERIOD + 0.5, 1.0) - 0.5
    dv = torch.remainder(v / _DOT_PERIOD + 0.5, 1.0) - 0.5
    dot = _rho(du, dv) * _DOT_PERIOD - 0.15
    return torch.maximum(_rho(u, v) - 1.0, dot)


def _frame(u: Tensor, v: Tensor) -> Tensor:
    return (torch.maximum(u.abs(), v.abs()) - 0.68).abs() - 0.17


def _half_disc(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(_rho(u, v) - 1.0, -v - 0.05)


FIGURES: dict[str, Figure] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
    "stripes": _stripes,
    "checker": _checker,
    "crescent": _crescent,
    "dots": _dots,
    "frame": _frame,
    "half_disc": _half_disc,
}
CLASS_NAMES: tuple[str, ...] = tuple(FIGURES)
MAX_CLASSES = len(CLASS_NAMES)

# Drawn sizes are radii in units of half the image side.
_MAIN_SCALE = (0.30, 0.55)
_DISTRACTOR_SCALE = (0.14, 0.28)
_DISTRACTOR_ALPHA = (0.25, 0.55)
_RENDER_CHUNK = 1024  # images rendered at once: bounds memory, results do not depend on it


def _uniform(gen: torch.Generator, shape: Sequence[int] | int, low: float, high: float) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return low + (high - low) * torch.rand(shape, generator=gen)


def _draw(canvas: Tensor, grid: Tensor, kind: Tensor, cx: Tensor, cy: Tensor, scale: Tensor,
          angle: Tensor, colour: Tensor, alpha: Tensor, image_size: int) -> None:
    """Alpha-blend one figure per image into ``canvas`` (N, 3, S, S) in place."""
    gx, gy = grid  # (S, S) each, coordinates in [-1, 1]
    dx = gx.unsqueeze(0) - cx.view(-1, 1, 1)
    dy = gy.unsqueeze(0) - cy.view(-1, 1, 1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    s = scale.view(-1, 1, 1)
    u = (cos * dx + sin * dy) / s
    v = (-sin * dx + cos * dy) / s
    dist = torch.empty_like(u)
    for index, figure in enumerate(FIGURES.values()):
        rows = (kind == index).nonzero().flatten()
        if len(rows):
            dist[rows] = figure(u[rows], v[rows])
    pixel = 2.0 / image_size / s  # one pixel in local units
    # Linear ramp one pixel wide across the edge: anti-aliased yet sharp at 32x32.
    coverage = (0.5 - dist / pixel).clamp_(0.0, 1.0)
    mask = coverage.unsqueeze(1) * alpha.view(-1, 1, 1, 1)
    canvas.mul_(1 - mask).add_(mask * colour.view(-1, 3, 1, 1))


def generate_shapes(
    n_samples: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    num_classes: int = MAX_CLASSES,
    noise: float = 0.1,
    clutter: int = 2,
) -> tuple[Tensor, Tensor]:
    """``n_samples`` images (N, 3, S, S) float32, normalised to about [-1, 1], and labels (N,) long.

    Labels are balanced (counts differ by at most one) and shuffled. ``clutter``
    distractors per image are figures of other classes, smaller and semi-transparent;
    ``noise`` is the standard deviation of additive pixel noise on the [0, 1] scale.
    Deterministic in all arguments.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must lie in [2, {MAX_CLASSES}], got {num_classes!r}")
    if n_samples < 1 or image_size < 1 or clutter < 0 or not noise >= 0:
        raise ValueError(
            f"need n_samples >= 1, image_size >= 1, clutter >= 0, noise >= 0; got "
            f"{n_samples!r}, {image_size!r}, {clutter!r}, {noise!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    draws = _draw_parameters(gen, n_samples, num_classes, clutter)
    images = torch.empty(n_samples, 3, image_size, image_size)
    noise_gen = torch.Generator().manual_seed(draws["pixel_noise_seed"])
    for start in range(0, n_samples, _RENDER_CHUNK):
        sl = slice(start, min(start + _RENDER_CHUNK, n_samples))
        canvas = _render(draws, sl, image_size, clutter)
        if noise > 0:
            canvas += noise * torch.randn(canvas.shape, generator=noise_gen)
        images[sl] = (canvas - 0.5) / 0.5
    return images, draws["labels"]


def _draw_parameters(gen: torch.Generator, n: int, c: int, clutter: int) -> dict:
    """Every random parameter of ``n`` images, drawn from ``gen`` in a fixed order before rendering."""
    labels = (torch.arange(n) % c)[torch.randperm(n, generator=gen)]
    scale = _uniform(gen, n, *_MAIN_SCALE)
    cx, cy = ((1 - scale) * _uniform(gen, n, -0.85, 0.85) for _ in range(2))
    angle = _uniform(gen, n, 0, 2 * math.pi)
    colour = torch.rand(n, 3, generator=gen)
    # Background: every channel 0.3-0.7 away from the figure's colour, so colour alone never
    # hides the figure (the gradient and blotches below may still lower local contrast).
    background = torch.remainder(colour + _uniform(gen, (n, 3), 0.3, 0.7), 1.0)
    gradient_dir = _uniform(gen, n, 0, 2 * math.pi)
    gradient_amp = _uniform(gen, (n, 3), -0.25, 0.25)
    blotches = torch.randn(n, 3, 4, 4, generator=gen) * 0.06
    d_kind = (labels.view(-1, 1) + torch.randint(1, c, (n, clutter), generator=gen)) % c
    d_scale = _uniform(gen, (n, clutter), *_DISTRACTOR_SCALE)
    d_cx, d_cy = ((1 - d_scale) * _uniform(gen, (n, clutter), -0.95, 0.95) for _ in range(2))
    d_angle = _uniform(gen, (n, clutter), 0, 2 * math.pi)
    d_colour = torch.rand(n, clutter, 3, generator=gen)
    d_alpha = _uniform(gen, (n, clutter), *_DISTRACTOR_ALPHA)
    pixel_noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return {
        "labels": labels, "scale": scale, "cx": cx, "cy": cy, "angle": angle, "colour": colour,
        "background": background, "gradient_dir": gradient_dir, "gradient_amp": gradient_amp, "blotches": blotches,
        "d_kind": d_kind, "d_scale": d_scale, "d_cx": d_cx, "d_cy": d_cy, "d_angle": d_angle, "d_colour": d_colour,
        "d_alpha": d_alpha, "pixel_noise_seed": pixel_noise_seed,
    }


def _render(d: dict, sl: slice, size: int, clutter: int) -> Tensor:
    """Images ``sl`` of the parameters ``d`` on the [0, 1] scale, before pixel noise."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([gx, gy])
    m = sl.stop - sl.start
    ramp = torch.cos(d["gradient_dir"][sl]).view(-1, 1, 1) * gx + torch.sin(d["gradient_dir"][sl]).view(-1, 1, 1) * gy
    canvas = d["background"][sl].view(m, 3, 1, 1) + d["gradient_amp"][sl].view(m, 3, 1, 1) * ramp.unsqueeze(1)
    canvas = canvas + F.interpolate(d["blotches"][sl], size=(size, size), mode="bicubic", align_corners=False)
    canvas = canvas.contiguous()
    _draw(canvas, grid, d["labels"][sl], d["cx"][sl], d["cy"][sl], d["scale"][sl], d["angle"][sl], d["colour"][sl],
          torch.ones(m), size)
    for k in range(clutter):
        _draw(canvas, grid, d["d_kind"][sl, k], d["d_cx"][sl, k], d["d_cy"][sl, k], d["d_scale"][sl, k],
              d["d_angle"][sl, k], d["d_colour"][sl, k], d["d_alpha"][sl, k], size)
    return canvas


# -- model ----------------------------------------------------------------------------------
class ShapesNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages of BasicBlocks (strides 1, 2, 2), pool, linear."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), blocks: int = 2, num_classes: int = MAX_CLASSES):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = conv_bn(3, w1)
        self.stage1 = self._stage(w1, w1, blocks, stride=1)
        self.stage2 = self._stage(w1, w2, blocks, stride=2)
        self.stage3 = self._stage(w2, w3, blocks, stride=2)
        self.fc = nn.Linear(w3, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(ResidualBlock(cin, cout, stride), *(ResidualBlock(cout, cout) for _ in range(blocks - 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_shapes_model(
    widths: Sequence[int] = (16, 32, 64), blocks: int = 2, num_classes: int = MAX_CLASSES
) -> nn.Module:
    """Module-level factory so ``functools.partial(build_shapes_model, ...)`` pickles for Ray."""
    return ShapesNet(tuple(widths), blocks, num_classes)


# -- task -----------------------------------------------------------------------------------
_SHAPES_VERSION = 1  # bump when the generator, architecture or training changes
SHAPES_DEFAULTS: dict = {
    "seed": 0,
    "n_samples": 12000,      # 8400 train / 1200 calibration / 2400 validation (1 sample < 0.05 pt)
    "image_size": 32,
    "num_classes": 12,       # every figure: fewer classes are too easy to tell pruned models apart
    "noise": 0.1,
    "clutter": 2,
    # The widest nets that still train within a single-core benchmark budget.
    "widths": [16, 32, 64],
    "blocks": 2,
    "epochs": 6,
    "batch_size": 64,
    "lr": 0.05,              # 0.1 diverges mid-schedule
    "split": [0.7, 0.1, 0.2],
}


def shapes_options(options: Mapping) -> dict:
    """``options`` merged over the defaults and validated (one-line ``ValueError`` naming the option)."""
    opts = task_options("shapes", options, SHAPES_DEFAULTS)
    minimum = {"seed": 0, "n_samples": 3, "image_size": 8, "clutter": 0, "blocks": 1, "epochs": 1, "batch_size": 1}
    for key, low in minimum.items():
        check_int(f"shapes option {key}", opts[key], low)
    wanted = f"an integer in [2, {MAX_CLASSES}]"
    check_option("shapes", "num_classes", opts["num_classes"], check_int, 2, MAX_CLASSES, wanted=wanted)
    if opts["n_samples"] < opts["num_classes"]:
        raise option_error("shapes", "n_samples", f"at least num_classes ({opts['num_classes']})", opts["n_samples"])
    return {
        **opts,
        "widths": check_widths("shapes", opts["widths"]),
        "split": check_split("shapes", opts["split"]),
        "noise": check_option("shapes", "noise", opts["noise"], check_number, 0, wanted="a finite number >= 0"),
        "lr": check_number("shapes option lr", opts["lr"], positive=True),
    }


def _flip_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flip of the whole batch (every class is closed under mirroring)."""
    return torch.flip(x, dims=(3,)) if bool(torch.rand((), generator=gen) < 0.5) else x


@register_task("shapes")
def shapes_task(options: dict, cache_dir: Path) -> Task:
    """Procedural shapes (see module docstring) with a CIFAR-style ResNet, trained once and cached."""
    opts = shapes_options(options)
    config = {"task": "shapes", "version": _SHAPES_VERSION, **opts}
    x, y = generate_shapes(
        opts["n_samples"], seed=opts["seed"], image_size=opts["image_size"], num_classes=opts["num_classes"],
        noise=opts["noise"], clutter=opts["clutter"],
    )
    build = functools.partial(build_shapes_model, tuple(opts["widths"]), opts["blocks"], opts["num_classes"])
    return trained_task("shapes", x, y, build=build, num_classes=opts["num_classes"], opts=opts, config=config,
                        cache_dir=cache_dir, augment=_flip_augment)
