"""Devices: which torch device an evaluation runs on, and moving models and batches there.

``[evaluation] device`` is ``"auto"`` (CUDA when this process sees a GPU, else the CPU),
``"cpu"``, ``"cuda"`` or ``"cuda:N"``. The name is checked where the settings are built
(``check_device``: syntax only, so stored settings read back anywhere); whether the device
exists is checked where the work runs (``resolve_device``): on the driver before a run
starts (``search.setup``), and in each worker, where Ray's ``num_gpus`` decides which GPUs
the process sees (``CUDA_VISIBLE_DEVICES``), so ``"cuda"`` there is the GPU Ray gave it.

Each phase of an evaluation (pruning, recovery, measurement, timing) runs on the resolved
device and hands a model back on the device it was given on (``on_device``), so a caller
holding a CPU model (the export) keeps a CPU model to save and export.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:(0|[1-9][0-9]{0,3}))$")


def check_device(name: str, value: Any) -> str:
    """``value`` when it is a device name of ``DEVICE_CHOICES`` (syntax only), else ``ValueError``."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in DEVICE_CHOICES)}, got {value!r}")
    return value


def resolve_device(value: str) -> torch.device:
    """The torch device ``value`` names in this process; ``ValueError`` (one line) when it
    asks for CUDA and this process has no CUDA, or for a GPU index it does not see."""
    check_device("device", value)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {value!r} asks for CUDA, but CUDA is not available here (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False): use device = \"cpu\" or \"auto\""
        )
    device = torch.device(value)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {value!r}: this process sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (else buffers) live; the CPU for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(data: Any, device: torch.device) -> Any:
    """``data`` (a tensor, or tuples/lists/dicts of them, e.g. a batch) with every tensor on
    ``device``; anything else is returned as it is. No copy when already there."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(v, device) for v in data)
    return data


def placed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` when it is on ``device``, else a copy moved there (``model`` is not modified)."""
    if model_device(model) == device:
        return model
    return copy.deepcopy(model).to(device)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` moved (in place) to ``device`` for the block, then back to where it was."""
    home = model_device(model)
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
