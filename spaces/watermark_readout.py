"""Reading a watermark back: kept channel counts from a policy, a model, a state dict or an
export directory; the verification result; and the export's ``watermark.json`` manifest."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from spaces.groups import ChannelGroup, out_channels
from spaces.policy import Policy
from spaces.space import kept_channels
from spaces.watermark_capacity import channels_of

if TYPE_CHECKING:
    from spaces.watermark import Watermark

MANIFEST_NAME = "watermark.json"
MANIFEST_FORMAT = "prunesearch-watermark"

Groups = Sequence[ChannelGroup] | Mapping[str, int]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking a model against a key and message."""

    n_bits: int
    matches: int
    ber: float
    p_value: float
    alpha: float

    @property
    def passed(self) -> bool:
        """The model carries this key's mark: p-value below ``alpha``."""
        return self.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_bits": self.n_bits, "matches": self.matches, "ber": self.ber,
            "p_value": self.p_value, "alpha": self.alpha, "passed": self.passed,
        }

    def describe(self) -> str:
        verdict = "watermark PRESENT" if self.passed else "watermark NOT found"
        return (
            f"{verdict}: {self.matches}/{self.n_bits} bits match (BER {self.ber:.3f}), "
            f"p-value {self.p_value:.3g} vs alpha {self.alpha:g}"
        )


# -- reading channel counts ----------------------------------------------------------------------
def channel_counts_from_policy(policy: Policy, groups: Groups, round_to: int = 1) -> dict[str, int]:
    """Kept counts a policy asks for (no model built)."""
    return {n: kept_channels(c, policy.ratio(n), round_to) for n, c in channels_of(groups).items()}


def _units(groups: Groups) -> dict[str, int]:
    """Channels per unit of each group (a whole head or normalisation group: ``spaces.units``;
    1 for plain channel groups and for groups given as a name -> count mapping)."""
    if isinstance(groups, Mapping):
        return {str(k): 1 for k in groups}
    return {g.name: int(getattr(g, "unit", 1)) for g in groups}


def _in_units(widths: Mapping[str, int], groups: Groups) -> dict[str, int]:
    """Kept units from a pruned model's widths: what the policy and the watermark count."""
    units = _units(groups)
    return {name: width // units[name] for name, width in widths.items()}


def channel_counts_from_model(model: nn.Module, groups: Groups) -> dict[str, int]:
    """Kept units (channels, or whole heads / normalisation groups) of each group's root
    module in a (pruned) model, read from its out width."""
    modules = dict(model.named_modules())
    widths = {}
    for name in channels_of(groups):
        if name not in modules:
            raise ValueError(f"model has no module {name!r}: not derived from this base architecture")
        widths[name] = out_channels(modules[name])
    return _in_units(widths, groups)


def channel_counts_from_state_dict(state_dict: Mapping[str, Any], groups: Groups) -> dict[str, int]:
    """Dim 0 of each group root's ``<name>.weight`` (conv/linear weights are out-channels
    first), in the group's units.

    Works on ``model.state_dict()``, a loaded ``weights.pt`` and ``ExportedProgram.state_dict``.
    """
    counts = {}
    for name in channels_of(groups):
        weight = state_dict.get(f"{name}.weight")
        if weight is None or not hasattr(weight, "shape") or len(weight.shape) < 1:
            raise ValueError(f"no weight {name + '.weight'!r} in the state dict: not derived from this base architecture")
        counts[name] = int(weight.shape[0])
    return _in_units(counts, groups)


def channel_counts_from_exported(program: Any, groups: Groups) -> dict[str, int]:
    """Counts from a ``torch.export.ExportedProgram`` (parameter shapes; constants as fallback)."""
    tensors: dict[str, Any] = dict(getattr(program, "constants", {}) or {})
    tensors.update(program.state_dict)
    return channel_counts_from_state_dict(tensors, groups)


def channel_counts_from_export_dir(directory: str | Path, groups: Groups, *, trust_program: bool = False) -> dict[str, int]:
    """Counts from an export directory: ``weights.pt`` shapes (``weights_only`` load), else
    ``model.pt2`` when ``trust_program`` (``torch.export.load`` unpickles, so a model of
    unknown origin is never read that way by default).

    Reads the architecture itself, never policy.json (which anyone could edit).
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"export directory {str(d)!r} does not exist")
    weights, program = d / "weights.pt", d / "model.pt2"
    if weights.is_file():
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file: a bad-input error, not a crash
            raise ValueError(f"cannot read {str(weights)!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if not isinstance(state, Mapping):
            raise ValueError(f"{str(weights)!r} is not a state_dict")
        return channel_counts_from_state_dict(state, groups)
    if program.is_file() and not trust_program:
        raise ValueError(
            f"export directory {str(d)!r} has no weights.pt; model.pt2 is not read because loading it "
            "can run code: copy the export's weights.pt next to it"
        )
    if program.is_file():
        try:
            ep = torch.export.load(str(program))
        except Exception as exc:
            raise ValueError(f"cannot read {str(program)!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        return channel_counts_from_exported(ep, groups)
    raise ValueError(f"export directory {str(d)!r} has neither weights.pt nor model.pt2")


# -- watermark.json -------------------------------------------------------------------------------
def write_manifest(directory: str | Path, watermark: Watermark) -> Path:
    """Write ``watermark.json`` (bit count, carrier count, message hash, scheme; no key)."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(watermark.manifest(), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read an export's ``watermark.json``; ``ValueError`` when missing or malformed."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"no {MANIFEST_NAME} in {str(Path(directory))!r}: the export was not watermarked")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{str(path)!r} is not a prunesearch watermark manifest")
    return data
