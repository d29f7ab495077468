"""An exported model's deployable files: ``model.pt2`` (``torch.export``) and ``model.onnx``,
both with a dynamic batch dimension, each checked against the PyTorch model it came from.

The ONNX file is written by ``torch.onnx.export``'s ``torch.export``-based exporter (it needs
the ``onnx`` and ``onnxscript`` packages; large models put their weights in
``model.onnx.data`` beside it). With ``onnxruntime`` installed (all three are the
``prunesearch[onnx]`` extra) the file is run on a batch of ``CHECK_BATCH`` inputs and
compared with PyTorch; the largest absolute difference goes into ``metrics.json``
(``onnx_check``), and a file that disagrees beyond ``TOLERANCE`` is a runtime error, not a
silent export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

CHECK_BATCH = 64
TOLERANCE = 1e-4


def _batch_of(example: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` inputs shaped like ``example`` (a batch of 1): random values of its dtype."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, *example.shape[1:])
    if example.dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=example.dtype)
    high = int(example.max().item()) + 1 if example.numel() else 2  # token ids seen in the example
    return torch.randint(0, max(high, 2), shape, generator=generator, dtype=example.dtype)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notes that do not concern a prunesearch model (torchvision's operators
    not registered, its own deprecations) off the console; its errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _example_call(example: Any, batch: int = 2) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, dynamic_shapes)`` calling a model on ``batch`` copies of ``example``
    (a tensor, a tuple of tensors or a dict of keyword tensors), the batch axis dynamic."""
    def grow(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:]).clone()

    auto = {0: torch.export.Dim.AUTO}
    if isinstance(example, dict):
        return (), {k: grow(v) for k, v in example.items()}, {k: auto for k in example}
    if isinstance(example, (tuple, list)):
        return tuple(grow(t) for t in example), {}, tuple(auto for _ in example)
    return (grow(example),), {}, (auto,)


def write_pt2(model: nn.Module, example: Any, path: Path) -> None:
    # Batch dimension dynamic (an example of 2: a batch of 1 would be specialised to 1).
    args, kwargs, dynamic = _example_call(example)
    program = torch.export.export(model.eval(), args, kwargs=kwargs, dynamic_shapes=dynamic)
    torch.export.save(program, str(path))


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any] | None:
    """``model.onnx`` with a dynamic batch axis (input ``input``, output ``output``); returns
    the onnxruntime check (None when onnxruntime is not installed)."""
    batch2 = example.expand(2, *example.shape[1:]).clone()
    with _quiet_exporter():
        torch.onnx.export(model.eval(), (batch2,), str(path), dynamo=True, verbose=False, input_names=["input"],
                          output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime is not installed: %s was not checked against PyTorch (pip install "
                    "'prunesearch[onnx]')", path)
        return None
    return check_onnx(model, example, path)


def check_onnx(model: nn.Module, example: torch.Tensor, path: Path, batch: int = CHECK_BATCH) -> dict[str, Any]:
    """Run ``path`` in onnxruntime (CPU) on ``batch`` inputs; ``RuntimeError`` when it differs
    from ``model`` by more than ``TOLERANCE``."""
    import onnxruntime

    inputs = _batch_of(example.cpu(), batch)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    reference = next(model.parameters(), torch.empty(0))
    with torch.no_grad():
        want = model.eval()(inputs.to(reference.device)).cpu().numpy()
    diff = float(abs(got - want).max())
    if not diff <= TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} on a batch of {batch} "
                           f"(more than {TOLERANCE})")
    return {"batch": batch, "max_abs_diff": diff, "runtime": f"onnxruntime {onnxruntime.__version__}"}


def write_formats(model: nn.Module, task: Any, directory: Path, formats: Sequence[str]) -> dict[str, Any]:
    """The requested formats of ``model``; returns what goes into ``metrics.json``."""
    example = task.example_inputs
    out: dict[str, Any] = {}
    if "pt2" in formats:
        write_pt2(model, example, directory / "model.pt2")
    if "onnx" in formats:
        out["onnx_check"] = write_onnx(model, example, directory / "model.onnx")
    return out
