"""``image-folder``: a local directory in torchvision ``ImageFolder`` layout
(``root/<class>/<image>``) read with Pillow, with a user model ``"package.module:callable"``
and optional trained weights (trained here and cached when not given).

The images are decoded lazily: each split is an :class:`ImageFiles` dataset that decodes
(resizes, normalises) one image per item, read through a ``DataLoader`` with the task's
``num_workers`` option; loading the task reads only the files' headers and one image."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torch.utils.data import Dataset

from evaluators.task_training import config_hash, seeded_split, task_options, trained_splits_task
from evaluators.tasks import Task, check_options, import_object, one_line, register_task
from spaces.checks import check_int

Tensor = torch.Tensor

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
    "num_workers": 0,
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


def decode_image(file: str | Path, size: int, grayscale: bool) -> Tensor:
    """One image as a ``(C, size, size)`` float tensor in [0, 1] (bilinear resize)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(file) as img:
            img = img.convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as exc:
        raise ValueError(f"cannot read image {str(file)!r}: {one_line(exc)}") from None
    return torch.from_numpy(np.ascontiguousarray(arr[None] if grayscale else arr.transpose(2, 0, 1)))


def _check_headers(samples: list[tuple[Path, int]]) -> None:
    """``ValueError`` naming the first file Pillow cannot identify (headers only: no decoding)."""
    from PIL import Image

    for file, _ in samples:
        try:
            with Image.open(file):
                pass
        except Exception as exc:
            raise ValueError(f"cannot read image {str(file)!r}: {one_line(exc)}") from None


def _normalizer(mean: Any, std: Any, channels: int) -> tuple[Tensor, Tensor] | None:
    """``(mean, std)`` as ``(C, 1, 1)`` tensors (None when neither is given)."""
    if mean is None and std is None:
        return None
    try:
        m = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32).view(-1, 1, 1)
    except (TypeError, ValueError):
        raise ValueError(f"image-folder mean/std must be lists of numbers, got {mean!r} / {std!r}") from None
    if m.numel() not in (1, channels) or s.numel() not in (1, channels) or bool((s <= 0).any()):
        raise ValueError(f"image-folder mean/std must have 1 or {channels} values (std > 0), got {mean!r} / {std!r}")
    return m, s


class ImageFiles(Dataset):
    """Image files and their labels, decoded (and normalised) one item at a time."""

    def __init__(self, files: list[str], labels: list[int], size: int, grayscale: bool,
                 norm: tuple[Tensor, Tensor] | None):
        self.files, self.labels = files, torch.tensor(labels, dtype=torch.long)
        self.size, self.grayscale, self.norm = size, grayscale, norm

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = decode_image(self.files[index], self.size, self.grayscale)
        if self.norm is not None:
            x = (x - self.norm[0]) / self.norm[1]
        return x, self.labels[index]


def _folder_options(options: dict) -> dict:
    opts = task_options("image-folder", options, _FOLDER_DEFAULTS)
    if not opts["path"]:
        raise ValueError("task 'image-folder' needs option path = '<directory with one sub-directory per class>'")
    if not isinstance(opts["model"], str) or not opts["model"]:
        raise ValueError("task 'image-folder' needs option model = 'package.module:callable' returning an nn.Module")
    if not isinstance(opts["model_options"], Mapping):
        raise ValueError(f"image-folder option model_options must be a table, got {opts['model_options']!r}")
    try:
        check_int("image_size", opts["image_size"], 1)
    except ValueError:
        raise ValueError(f"image-folder option image_size must be a positive integer, got {opts['image_size']!r}") from None
    try:
        check_int("num_workers", opts["num_workers"], 0)
    except ValueError:
        raise ValueError(f"image-folder option num_workers must be an integer >= 0, got {opts['num_workers']!r}") from None
    return opts


def _check_logits(model: nn.Module, spec: str, x: Tensor, num_classes: int) -> None:
    with torch.no_grad():
        out = model.eval()(x[:1])
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model {spec!r} outputs {shape} for one image; expected (1, {num_classes}) logits")


def _load_weights(model: nn.Module, opts: dict) -> dict[str, Tensor]:
    try:
        state = torch.load(opts["weights"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise ValueError(f"cannot load weights {str(opts['weights'])!r} into {opts['model']!r}: {one_line(exc)}") from None
    return state


@register_task("image-folder")
def image_folder_task(options: dict, cache_dir: Path) -> Task:
    """A local ImageFolder directory with a user model (``"package.module:callable"``)."""
    opts = _folder_options(options)
    classes, samples = scan_image_folder(opts["path"])
    if len(samples) < 3:
        raise ValueError(f"image folder {str(opts['path'])!r} has {len(samples)} image(s); at least 3 are needed")
    _check_headers(samples)
    gray = bool(opts["grayscale"])
    norm = _normalizer(opts["mean"], opts["std"], 1 if gray else 3)
    files, labels = [str(f) for f, _ in samples], [label for _, label in samples]
    splits = tuple(ImageFiles([files[i] for i in idx], [labels[i] for i in idx], opts["image_size"], gray, norm)
                   for idx in seeded_split(len(files), tuple(opts["split"]), opts["seed"]))
    example = ImageFiles(files[:1], labels[:1], opts["image_size"], gray, norm)[0][0][None]

    build = functools.partial(build_model_from_spec, opts["model"], dict(opts["model_options"]))
    model = build()
    _check_logits(model, opts["model"], example, len(classes))
    stats = [[str(f.relative_to(opts["path"])), f.stat().st_size, f.stat().st_mtime_ns] for f, _ in samples]
    config = {  # num_workers changes how the images are read, not what: not part of the weights' name
        "task": "image-folder", **{k: v for k, v in opts.items() if k not in ("path", "num_workers")},
        "path": str(Path(opts["path"]).resolve()), "classes": classes, "files": config_hash({"files": stats}),
    }
    state = _load_weights(model, opts) if opts["weights"] else None
    task = trained_splits_task("image-folder", splits, example, build=build, num_classes=len(classes), opts=opts,
                               config=config, cache_dir=cache_dir, state=state)
    task.num_workers = opts["num_workers"]
    return task
