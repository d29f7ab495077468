"""How many bits each channel group can carry under a watermark scheme (needs no key)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from spaces.checks import check_int
from spaces.groups import ChannelGroup
from spaces.watermark_config import MAX_BITS_PER_CARRIER, WatermarkConfig
from spaces.watermark_qim import EPS, unit_range


def channels_of(groups: Sequence[ChannelGroup] | Mapping[str, int]) -> dict[str, int]:
    """Group name -> channels, from ``ChannelGroup``s or a mapping; ``ValueError`` when empty."""
    if isinstance(groups, Mapping):
        channels = {str(k): int(v) for k, v in groups.items()}
    else:
        channels = {g.name: int(g.channels) for g in groups}
    if not channels:
        raise ValueError("watermark needs at least one channel group")
    for name, c in channels.items():
        if c < 1:
            raise ValueError(f"group {name!r} has {c} channels")
    return channels


def _bits_for(channels: int, config: WatermarkConfig, ratio_min: float, ratio_max: float, round_to: int) -> int:
    ulo, uhi = unit_range(channels, ratio_min, ratio_max, round_to)
    n_units = uhi - ulo + 1
    if config.bits_per_carrier is not None:
        b = config.bits_per_carrier
        # Why the full period must fit: then every symbol has a lattice point in range.
        return b if config.delta * 2**b <= n_units else 0
    budget = 2 * config.max_shift * channels / round_to  # period (units) allowed by max_shift
    best = 0
    for b in range(1, MAX_BITS_PER_CARRIER + 1):
        period = config.delta * 2**b
        if period <= n_units and period <= budget + EPS:
            best = b
    return best


@dataclass(frozen=True)
class Capacity:
    """How many bits each group can carry (0: not a carrier) under a scheme."""

    bits_per_group: Mapping[str, int]
    delta: int
    round_to: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits_per_group", MappingProxyType(dict(self.bits_per_group)))

    @property
    def total(self) -> int:
        return sum(self.bits_per_group.values())

    @property
    def eligible(self) -> int:
        return sum(1 for b in self.bits_per_group.values() if b > 0)

    def describe(self, channels: Mapping[str, int] | None = None) -> str:
        """Multi-line table for ``prunesearch verify --capacity``."""
        lines = [
            f"watermark capacity: {self.total} bits over {self.eligible} of {len(self.bits_per_group)} groups "
            f"(delta = {self.delta * self.round_to} channels)"
        ]
        width = max(len(n) for n in self.bits_per_group)
        for name, bits in self.bits_per_group.items():
            ch = f"{channels[name]:>5} ch  " if channels is not None and name in channels else ""
            lines.append(f"  {name:<{width}}  {ch}{bits} bit{'s' if bits != 1 else ''}")
        return "\n".join(lines)


def plan_capacity(
    groups: Sequence[ChannelGroup] | Mapping[str, int],
    config: WatermarkConfig,
    *,
    ratio_min: float = 0.1,
    ratio_max: float = 1.0,
    round_to: int = 1,
) -> Capacity:
    """Bits each group can carry; needs no key (the capacity depends on channel counts only)."""
    if not 0 < ratio_min <= ratio_max <= 1:
        raise ValueError(f"ratio range must satisfy 0 < ratio_min <= ratio_max <= 1, got [{ratio_min}, {ratio_max}]")
    check_int("round_to", round_to, 1)
    channels = channels_of(groups)
    bits = {n: _bits_for(c, config, ratio_min, ratio_max, round_to) for n, c in channels.items()}
    return Capacity(bits_per_group=bits, delta=config.delta, round_to=round_to)


def space_capacity(space: Any, config: WatermarkConfig) -> Capacity:
    """:func:`plan_capacity` with the groups, ratio range and rounding of a ``SearchSpace``."""
    return plan_capacity(
        space.groups, config, ratio_min=space.ratio_min, ratio_max=space.ratio_max, round_to=space.round_to
    )
