"""Tasks: a model factory, its trained weights and the data an evaluation needs.

Built-ins (``available_tasks()``):

* ``digits`` — scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16, a
  fixed seeded 60/15/25 train/calibration/validation split and a small CNN with residual
  and depthwise (MobileNet-style) blocks, trained on CPU on first use and cached under
  ``cache_dir`` in a file named by a hash of the task config.
* ``image-folder`` — a local directory in torchvision ``ImageFolder`` layout
  (``root/<class>/<image>``) read with Pillow, with a user model ``"package.module:callable"``
  and optional trained weights (trained here and cached when not given).

Any other spec of the form ``"package.module:callable"`` is a plugin: ``callable(**options)``
must return a :class:`Task`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]
SPLITS = ("train", "calibration", "validation")


@dataclass
class Task:
    """A model architecture, its trained weights and the data to evaluate pruned copies on."""

    name: str
    build_model: Callable[[], nn.Module]      # the architecture, picklable (module-level fn / functools.partial)
    train: tuple[Tensor, Tensor]              # (x, y) CPU tensors
    calibration: tuple[Tensor, Tensor]        # small subset used by adaptive BN / importance / CaP
    validation: tuple[Tensor, Tensor]         # proxy accuracy is measured here
    example_inputs: Tensor                    # ONE sample (batch 1): costs are per sample
    num_classes: int
    base_state: dict[str, Tensor]             # trained weights of build_model()
    config: dict = field(default_factory=dict)  # what the task was built from (hashing / display)

    def __post_init__(self) -> None:
        if not callable(self.build_model):
            raise ValueError(f"task {self.name!r}: build_model must be callable, got {type(self.build_model).__name__}")
        for split in SPLITS:
            pair = getattr(self, split)
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise ValueError(f"task {self.name!r}: {split} must be a tuple (x, y) of tensors")
            x, y = pair
            if len(x) != len(y):
                raise ValueError(f"task {self.name!r}: {split} has {len(x)} inputs but {len(y)} labels")
            if len(x) == 0:
                raise ValueError(f"task {self.name!r}: {split} split is empty")
        if not isinstance(self.example_inputs, Tensor) or self.example_inputs.shape[:1] != (1,):
            raise ValueError(f"task {self.name!r}: example_inputs must be a tensor holding one sample (batch 1)")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"task {self.name!r}: num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not isinstance(self.base_state, Mapping):
            raise ValueError(f"task {self.name!r}: base_state must be a state_dict, got {type(self.base_state).__name__}")

    def base_model(self) -> nn.Module:
        """A fresh ``build_model()`` loaded with ``base_state``, in eval mode."""
        model = self.build_model()
        model.load_state_dict(self.base_state)
        return model.eval()

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return getattr(self, split)

    def batches(
        self, split: str, batch_size: int, limit: int | None = None, seed: int | None = 0
    ) -> list[Batch]:
        """``split`` cut into batches of ``batch_size``.

        Samples are shuffled by ``seed`` (``None`` keeps the stored order); ``limit`` caps
        the number of *samples* (not batches) taken after shuffling.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
        x, y = self.split(split)
        n = len(y) if limit is None else min(limit, len(y))
        if seed is None:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return [(x[idx[i : i + batch_size]], y[idx[i : i + batch_size]]) for i in range(0, n, batch_size)]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc`` on one line (error messages must be one line)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- registry -------------------------------------------------------------------------------
TaskBuilder = Callable[[dict, Path], Task]
_REGISTRY: dict[str, TaskBuilder] = {}


def register_task(name: str):
    """Decorator for a built-in task: ``fn(options: dict, cache_dir: Path) -> Task``."""

    def wrap(fn: TaskBuilder) -> TaskBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"task {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_tasks() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def import_object(spec: str, what: str = "plugin") -> Any:
    """Resolve ``"package.module:attr[.attr]"``; every failure is one ``ValueError`` line."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} is not of the form 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing the module
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {one_line(exc)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def check_options(fn: Callable, spec: str, options: Mapping[str, Any], what: str) -> None:
    """``ValueError`` when ``fn`` cannot be called with ``**options`` (checked before calling)."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(**options)
    except TypeError as exc:
        raise ValueError(f"{what} {spec!r} does not accept options {sorted(options)}: {exc}") from None


def load_task(spec: str, options: Mapping | None = None, cache_dir: str | Path = "studies/cache") -> Task:
    """The task named ``spec`` (a registered name or ``"package.module:callable"``).

    Built-in tasks train their base model here on first use and cache the weights under
    ``cache_dir``. Bad input (unknown name, broken plugin, bad options) raises ``ValueError``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"task must be a registered name or 'package.module:callable', got {spec!r}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"task options must be a mapping, got {type(options).__name__}")
    options = dict(options or {})
    if spec in _REGISTRY:
        return _REGISTRY[spec](options, Path(cache_dir))
    if ":" not in spec:
        raise ValueError(
            f"unknown task {spec!r} (built-in: {', '.join(available_tasks())}; or a plugin 'package.module:callable')"
        )
    factory = import_object(spec, "task plugin")
    check_options(factory, spec, options, "task plugin")
    task = factory(**options)
    if not isinstance(task, Task):
        raise ValueError(f"task plugin {spec!r} returned {type(task).__name__}, not an evaluators.tasks.Task")
    return task


# -- helpers shared by the built-ins ---------------------------------------------------------
def _check_options(task: str, options: Mapping, defaults: Mapping) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) for task {task!r}: {', '.join(unknown)} (known: {', '.join(sorted(defaults))})")
    return {**defaults, **options}


def config_hash(config: Mapping) -> str:
    """Short stable hash of a JSON-able config (names cache files)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seeded_split(n: int, fractions: tuple[float, float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a seeded random train/calibration/validation split of ``n`` samples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_cal = int(round(fractions[1] * n))
    n_train = max(1, min(n_train, n - 2))
    n_cal = max(1, min(n_cal, n - n_train - 1))
    return perm[:n_train], perm[n_train : n_train + n_cal], perm[n_train + n_cal :]


def train_classifier(
    model: nn.Module,
    data: Batch,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    threads: int = 1,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    desc: str = "training",
) -> dict[str, Tensor]:
    """Deterministic SGD (one-cycle cosine) training; returns the state_dict."""
    from tqdm.auto import tqdm

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # fixed threads: same weights on every machine
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x_all, y_all = data
        steps_per_epoch = math.ceil(len(y_all) / batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        for _ in tqdm(range(epochs), desc=desc, leave=False, disable=None):
            order = torch.randperm(len(y_all), generator=gen)
            for i in range(0, len(y_all), batch_size):
                idx = order[i : i + batch_size]
                x, y = x_all[idx], y_all[idx]
                if augment is not None:
                    x = augment(x, gen)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(previous)


def _save_atomic(state: Mapping[str, Tensor], path: Path) -> None:
    # Several processes (pytest workers, launchers) may train the same task at once:
    # write to a temporary file and rename so nobody ever loads a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_weights(path: Path, train: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Weights from ``path`` (``weights_only=True``), training and saving them when missing."""
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt cache file is rebuilt, not fatal
            log.warning("cached weights %s unreadable (%s); retraining", path, exc)
    start = time.perf_counter()
    state = train()
    log.info("trained base model in %.1f s -> %s", time.perf_counter() - start, path)
    _save_atomic(state, path)
    return state


def accuracy_of(model: nn.Module, data: Batch, batch_size: int = 256) -> float:
    model.eval()
    x, y = data
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(y)


# -- digits ---------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=False)
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, identity residual."""

    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        hidden = channels * expand
        self.expand = _conv_bn(channels, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, groups=hidden)
        self.project = _conv_bn(hidden, channels, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class DigitsNet(nn.Module):
    """Small CNN for 1x16x16 digits: stem, 2 residual stages, a depthwise block, a head."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), num_classes: int = 10):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = _conv_bn(1, w1)
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
    "widths": [24, 48, 96],  # ~7.6 MMACs; narrower nets lose most accuracy at 50% uniform pruning
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


@register_task("digits")
def digits_task(options: dict, cache_dir: Path) -> Task:
    """scikit-learn digits with a small residual + depthwise CNN (trained once, cached)."""
    opts = _check_options("digits", options, _DIGITS_DEFAULTS)
    for key in ("seed", "image_size", "epochs", "batch_size"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
            raise ValueError(f"digits option {key} must be a positive integer, got {v!r}")
    if not (isinstance(opts["widths"], (list, tuple)) and len(opts["widths"]) == 3
            and all(isinstance(w, int) and w >= 2 for w in opts["widths"])):
        raise ValueError(f"digits option widths must be 3 integers >= 2, got {opts['widths']!r}")
    split = opts["split"]
    if not (isinstance(split, (list, tuple)) and len(split) == 3 and all(isinstance(f, (int, float)) and f > 0 for f in split)
            and abs(sum(split) - 1.0) < 1e-6):
        raise ValueError(f"digits option split must be 3 positive fractions summing to 1, got {split!r}")
    widths = tuple(int(w) for w in opts["widths"])
    config = {"task": "digits", "version": _DIGITS_VERSION, **opts, "widths": list(widths), "split": list(split)}

    x, y = _digits_data(opts["image_size"])
    train_idx, cal_idx, val_idx = seeded_split(len(y), tuple(split), opts["seed"])
    train, calibration, validation = (x[train_idx], y[train_idx]), (x[cal_idx], y[cal_idx]), (x[val_idx], y[val_idx])
    build = functools.partial(build_digits_model, widths, 10)

    def fit() -> dict[str, Tensor]:
        torch.manual_seed(opts["seed"])
        model = build()
        state = train_classifier(
            model, train, epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
            seed=opts["seed"], augment=_shift_augment, desc="training digits base model",
        )
        log.info("digits base model: validation accuracy %.4f", accuracy_of(model, validation))
        return state

    state = cached_weights(cache_dir / f"digits-{config_hash(config)}.pt", fit)
    return Task(
        name="digits", build_model=build, train=train, calibration=calibration, validation=validation,
        example_inputs=x[:1].clone(), num_classes=10, base_state=state, config=config,
    )


# -- image folder ---------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_FOLDER_DEFAULTS = {
    "path": None,
    "model": None,
    "model_options": {},
    "image_size": 32,
    "weights": None,
    "grayscale": False,
    "mean": None,
    "std": None,
    "seed": 0,
    "split": [0.6, 0.15, 0.25],
    "epochs": 10,
    "batch_size": 64,
    "lr": 0.05,
}


def build_model_from_spec(spec: str, options: Mapping[str, Any]) -> nn.Module:
    """``spec(**options)`` for a ``"package.module:callable"`` model factory (picklable via partial)."""
    factory = import_object(spec, "model")
    check_options(factory, spec, options, "model")
    model = factory(**dict(options))
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def scan_image_folder(path: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-directory names) and (file, class index) pairs of an ImageFolder tree."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class sub-directories (expected root/<class>/<image>)")
    samples = []
    for index, cls in enumerate(classes):
        for file in sorted((root / cls).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((file, index))
    if not samples:
        raise ValueError(f"image folder {str(root)!r} has no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def _read_images(samples: list[tuple[Path, int]], size: int, grayscale: bool) -> tuple[Tensor, Tensor]:
    import numpy as np
    from PIL import Image

    images = []
    for file, _ in samples:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except Exception as exc:
            raise ValueError(f"cannot read image {str(file)!r}: {one_line(exc)}") from None
        images.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor([label for _, label in samples], dtype=torch.long)
    return x, y


def _normalize(x: Tensor, mean: Any, std: Any) -> Tensor:
    if mean is None and std is None:
        return x
    channels = x.shape[1]
    try:
        m = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32).view(1, -1, 1, 1)
    except (TypeError, ValueError):
        raise ValueError(f"image-folder mean/std must be lists of numbers, got {mean!r} / {std!r}") from None
    if m.numel() not in (1, channels) or s.numel() not in (1, channels) or bool((s <= 0).any()):
        raise ValueError(f"image-folder mean/std must have 1 or {channels} values (std > 0), got {mean!r} / {std!r}")
    return (x - m) / s


@register_task("image-folder")
def image_folder_task(options: dict, cache_dir: Path) -> Task:
    """A local ImageFolder directory with a user model (``"package.module:callable"``)."""
    opts = _check_options("image-folder", options, _FOLDER_DEFAULTS)
    if not opts["path"]:
        raise ValueError("task 'image-folder' needs option path = '<directory with one sub-directory per class>'")
    if not isinstance(opts["model"], str) or not opts["model"]:
        raise ValueError("task 'image-folder' needs option model = 'package.module:callable' returning an nn.Module")
    if not isinstance(opts["model_options"], Mapping):
        raise ValueError(f"image-folder option model_options must be a table, got {opts['model_options']!r}")
    size = opts["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image-folder option image_size must be a positive integer, got {size!r}")
    classes, samples = scan_image_folder(opts["path"])
    if len(samples) < 3:
        raise ValueError(f"image folder {str(opts['path'])!r} has {len(samples)} image(s); at least 3 are needed")
    x, y = _read_images(samples, size, bool(opts["grayscale"]))
    x = _normalize(x, opts["mean"], opts["std"])

    build = functools.partial(build_model_from_spec, opts["model"], dict(opts["model_options"]))
    model = build()
    with torch.no_grad():
        out = model.eval()(x[:1])
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, len(classes)):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model {opts['model']!r} outputs {shape} for one image; expected (1, {len(classes)}) logits")

    train_idx, cal_idx, val_idx = seeded_split(len(y), tuple(opts["split"]), opts["seed"])
    train, calibration, validation = (x[train_idx], y[train_idx]), (x[cal_idx], y[cal_idx]), (x[val_idx], y[val_idx])
    files = [[str(f.relative_to(opts["path"])), f.stat().st_size, f.stat().st_mtime_ns] for f, _ in samples]
    config = {
        "task": "image-folder", **{k: v for k, v in opts.items() if k != "path"},
        "path": str(Path(opts["path"]).resolve()), "classes": classes, "files": config_hash({"files": files}),
    }
    if opts["weights"]:
        try:
            state = torch.load(opts["weights"], map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise ValueError(f"cannot load weights {str(opts['weights'])!r} into {opts['model']!r}: {one_line(exc)}") from None
    else:
        def fit() -> dict[str, Tensor]:
            torch.manual_seed(opts["seed"])
            return train_classifier(
                build(), train, epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
                seed=opts["seed"], desc="training image-folder base model",
            )

        state = cached_weights(cache_dir / f"image-folder-{config_hash(config)}.pt", fit)
    return Task(
        name="image-folder", build_model=build, train=train, calibration=calibration, validation=validation,
        example_inputs=x[:1].clone(), num_classes=len(classes), base_state=dict(state), config=config,
    )


# Built-in tasks defined in their own modules register on import; imported last, once every
# helper above exists, so those modules can import this one (no cycle at import time).
import evaluators.synthetic  # noqa: E402,F401  (registers "shapes")
