"""Structural watermark in pruning rates (after Zhao et al. 2021, "Structural watermarking
to deep neural networks via network channel pruning").

The owner's bits live in *how many channels* selected groups keep, so the mark survives
fine-tuning and re-export and is read from the architecture alone (weight shapes).

Scheme (everything secret comes from the key through HMAC-SHA256):

* **Carriers.** A group is eligible when its kept-count range (the space's ratio range,
  in steps of ``round_to``) holds a full QIM period. An *allocation* rule decides which
  eligible groups carry how many bits (:data:`ALLOCATIONS`): ``"widest"`` (default) adds
  one bit at a time where a QIM period is the smallest fraction of the group's channels,
  so with fewer bits than the capacity the wide groups carry them and narrow ones stay
  free; ``"keyed"`` (scheme v1) fills eligible groups to capacity in keyed order. The
  carriers' order in the bit stream and ties are keyed. Non-carrier groups stay free.
* **QIM.** A carrier with ``b`` bits uses symbols ``s`` in ``[0, 2**b)`` (Gray-coded, so
  a one-step error flips one bit). Its kept count ``k`` must lie on the coset
  ``k/round_to = dither + s*delta (mod delta * 2**b)`` (``delta`` counts in ``round_to``
  units: a step of ``delta * round_to`` channels). The per-carrier keyed dither makes
  the decoded bits of an unmarked model (or of any model read with another key) uniform
  and independent, so matches follow Binomial(n, 1/2) under H0.
* **Decoding** maps ``k`` to the nearest symbol; a symbol owns ``delta`` consecutive
  counts, from ``floor(delta/2)`` below its lattice point to ``delta - 1 - floor(delta/2)``
  above. So with ``delta = 2`` one channel *less* (the model pruned further) never flips a
  bit, one channel more does; ``delta >= 3`` tolerates +-1 channel (units of ``round_to``).
  Projection always lands on the lattice point itself, so the full margin is kept.
* **Capacity.** Bits per carrier are set by its channel count: the largest ``b <= 8``
  with ``delta * round_to * 2**b <= 2 * max_shift * channels`` (the projection then moves
  a carrier by at most ``max_shift * channels`` away from the range ends; next to the ends
  up to one period minus one unit), or ``bits_per_carrier`` when fixed. Capacity depends on
  channel counts and these options only, never on the key.

Projection (watermark-aware search): :meth:`Watermark.project` moves each carrier's kept
count onto its coset inside the ratio range, by a projection rule (:data:`PROJECTIONS`):
``"capped"`` (default) takes the nearest lattice points and then moves carriers that went
up down instead until the policy's FLOPs are no more than the proposal's (so marking never
pushes a trial over a FLOPs constraint; only the range's lower end can force a carrier up);
``"nearest"`` and ``"fewer"`` are the plain rules. A carrier's ratio becomes exactly
``k / channels`` (so ``kept_channels`` gives ``k`` back). Such ratios are *off* the search
grid; the runner keeps the un-projected proposal alongside.

Cost (benchmarks/watermark.py, digits): a projection moves a carrier by up to half a period
(``delta * 2**bits / 2`` channels). Sizing bits by ``max_shift`` alone and filling narrow
groups first made the marked models lose several points; embed only the bits the p-value
needs (``n_bits``), spread over the widest groups, and project with the cap.

The key is never written anywhere: :func:`write_manifest` records bit count, carrier count,
capacity, the non-secret scheme parameters and SHA-256 of the message.

Typical use::

    config = WatermarkConfig(key_file="owner.key", message="(c) ACME 2025")
    wm = Watermark.from_space(space, config)          # ValueError: bad key / too long
    policy = wm.project(proposal)                     # every evaluated policy is marked
    ...
    result = wm.verify(channel_counts_from_model(pruned, space.groups))
    result.passed, result.ber, result.p_value
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

from spaces.groups import ChannelGroup, out_channels
from spaces.policy import Policy
from spaces.space import kept_channels

log = logging.getLogger(__name__)

MAX_BITS_PER_CARRIER = 8
MANIFEST_NAME = "watermark.json"
MANIFEST_FORMAT = "prunesearch-watermark"
SCHEME_VERSION = 2  # v2: allocation and projection rules recorded in the scheme
_DOMAIN = b"prunesearch-watermark/v1"
_EPS = 1e-9
# Scheme fields that change what is evaluated but not how a model's bits are read.
_DECODING_IRRELEVANT = frozenset({"projection"})

# -- message encodings (registry: name -> message bytes, n_bits -> bits) -------------------

def _registrar(table: dict[str, Any], kind: str) -> Callable[[str], Callable[[Any], Any]]:
    """A ``@register_<kind>(name)`` decorator filling ``table``; a name registers once."""

    def register(name: str) -> Callable[[Any], Any]:
        def wrap(fn: Any) -> Any:
            if name in table:
                raise ValueError(f"watermark {kind} {name!r} is already registered")
            table[name] = fn
            return fn

        return wrap

    register.__doc__ = f"Decorator adding a watermark {kind} under ``name``."
    return register


_ENCODINGS: dict[str, Callable[[bytes, int | None], list[int]]] = {}
register_encoding = _registrar(_ENCODINGS, "encoding")  # message bytes, n_bits -> bits


def _bytes_to_bits(data: bytes) -> list[int]:
    return [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]


def bits_to_bytes(bits: Sequence[int]) -> bytes:
    """Pack bits (MSB first) into bytes; a partial last byte is zero-padded."""
    out = bytearray()
    for i in range(0, len(bits), 8):
        chunk = list(bits[i : i + 8]) + [0] * (8 - len(bits[i : i + 8]))
        out.append(sum(int(b) << (7 - j) for j, b in enumerate(chunk)))
    return bytes(out)


@register_encoding("hash")
def _hash_bits(message: bytes, n_bits: int | None) -> list[int]:
    """``n_bits`` bits of SHAKE-256 of the message (domain-separated from the manifest's SHA-256)."""
    assert n_bits is not None
    digest = hashlib.shake_256(_DOMAIN + b"/message\0" + message).digest((n_bits + 7) // 8)
    return _bytes_to_bits(digest)[:n_bits]


@register_encoding("raw")
def _raw_bits(message: bytes, n_bits: int | None) -> list[int]:
    """The message's own bytes, 8 bits each (recoverable with :func:`bits_to_bytes`)."""
    return _bytes_to_bits(message)


# -- key -----------------------------------------------------------------------------------


def load_key(path: str | Path) -> bytes:
    """Read a watermark key file. A trailing newline is ignored.

    Raises ``ValueError`` (one line) when the file is missing, unreadable or empty.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(
            f"watermark key file {str(p)!r} does not exist (create one, e.g. `head -c 32 /dev/urandom > {p}`)"
        )
    if not p.is_file():
        raise ValueError(f"watermark key file {str(p)!r} is not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"watermark key file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    # Why: `echo secret > key` and `printf secret > key` must give the same key.
    key = data.rstrip(b"\r\n")
    if not key.strip():
        raise ValueError(f"watermark key file {str(p)!r} is empty")
    if len(key) < 16:
        log.warning("watermark key in %s is only %d bytes; use at least 16 random bytes", p, len(key))
    return key


def _prf(key: bytes, label: str, name: str) -> int:
    """Keyed pseudo-random 256-bit integer for (label, group name)."""
    msg = _DOMAIN + b"\0" + label.encode() + b"\0" + name.encode()
    return int.from_bytes(hmac.new(key, msg, hashlib.sha256).digest(), "big")


# -- carrier allocation (registry: which groups carry how many bits) --------------------------
#
# An allocation gets each group's maximum bits (key-independent), channels, the bits to
# place, the QIM step in channels, a keyed rank per group and ``fixed`` (bits_per_carrier
# is set: a carrier takes all its bits or none); it returns {group: bits} for the carriers,
# in bit-stream order. Total bits may exceed ``n_bits`` only when ``fixed`` (keyed padding).

Allocation = Callable[[Mapping[str, int], Mapping[str, int], int, int, Callable[[str], int], bool], dict[str, int]]
ALLOCATIONS: dict[str, Allocation] = {}
register_allocation = _registrar(ALLOCATIONS, "allocation")


@register_allocation("keyed")
def _allocate_keyed(max_bits, channels, n_bits, step, rank, fixed):
    """Eligible groups in keyed order, each filled to its maximum, until the message fits
    (scheme v1: a narrow group may carry its full capacity while wide ones stay free)."""
    out: dict[str, int] = {}
    for name in sorted((n for n, b in max_bits.items() if b > 0), key=lambda n: (rank(n), n)):
        if sum(out.values()) >= n_bits:
            break
        out[name] = max_bits[name]
    return out


@register_allocation("widest")
def _allocate_widest(max_bits, channels, n_bits, step, rank, fixed):
    """One bit at a time to the group whose QIM period would be the smallest *fraction of
    its channels* (keyed rank breaks ties).

    Why: a carrier with ``b`` bits moves a proposal by up to half a period, ``step * 2**b / 2``
    channels; what that costs in accuracy grows with the move relative to the layer, so bits
    go where a period is cheapest — wide groups get several, narrow ones none until needed.
    With fixed bits per carrier this takes the widest groups first.
    """
    bits = {n: 0 for n, b in max_bits.items() if b > 0}
    placed = 0
    while placed < n_bits:
        open_ = [n for n in bits if bits[n] < max_bits[n]]
        if not open_:
            break
        # increment: one bit, or a fixed-size carrier's whole bits at once
        inc = {n: (max_bits[n] if fixed else 1) for n in open_}
        best = min(open_, key=lambda n: (step * 2 ** (bits[n] + inc[n]) / channels[n], rank(n), n))
        bits[best] += inc[best]
        placed += inc[best]
    chosen = [n for n, b in bits.items() if b > 0]
    return {n: bits[n] for n in sorted(chosen, key=lambda n: (rank(n), n))}


# -- projection rules (registry: which coset point each carrier moves to) ---------------------
#
# A rule gets the watermark and the proposal and returns every carrier's kept count; each
# count must be a lattice point of the carrier's symbol inside the range.

Projection = Callable[["Watermark", Policy], dict[str, int]]
PROJECTIONS: dict[str, Projection] = {}
register_projection = _registrar(PROJECTIONS, "projection")  # (watermark, proposal) -> {carrier: kept}


@register_projection("nearest")
def _project_nearest(wm: "Watermark", policy: Policy) -> dict[str, int]:
    """Each carrier to its symbol's lattice point nearest to the proposal (ties: more channels)."""
    return {c.name: c.nearest(wm.proposed_count(c, policy), wm.symbol(c)) for c in wm.carriers}


@register_projection("fewer")
def _project_fewer(wm: "Watermark", policy: Policy) -> dict[str, int]:
    """Each carrier to its symbol's largest lattice point not above the proposal (the lowest
    in range when none is): costs only fall, but a carrier may lose up to a period - 1."""
    return {c.name: c.at_most(wm.proposed_count(c, policy), wm.symbol(c)) for c in wm.carriers}


@register_projection("capped")
def _project_capped(wm: "Watermark", policy: Policy) -> dict[str, int]:
    """Nearest points, then carriers moved up are moved down instead until the FLOPs are no
    more than the proposal's: the one switch that alone meets the budget with the smallest
    extra move (relative to the carrier's channels), else the switch saving the most FLOPs
    per extra move, and again. Why: a marked trial is then never reported at a cost it did
    not ask for and never pushed over a FLOPs constraint its proposal met, with far smaller
    moves than ``fewer``. Only the range's lower end can force a carrier above its proposal.
    Without a cost function (``Watermark(cost=None)``) this is ``nearest``.
    """
    counts = _project_nearest(wm, policy)
    if wm.cost is None:
        return counts
    budget = wm.cost(policy) * (1 + 1e-12)
    proposed = {c.name: wm.proposed_count(c, policy) for c in wm.carriers}
    down = {c.name: c.at_most(proposed[c.name], wm.symbol(c)) for c in wm.carriers}
    width = {c.name: c.channels for c in wm.carriers}
    flops = wm.cost(wm.with_counts(policy, counts))
    while flops > budget:
        raised = [n for n in counts if counts[n] > proposed[n] and down[n] < counts[n]]
        if not raised:
            break  # only the range's lower end forced carriers up: nothing cheaper is marked
        options = []
        for n in raised:
            after = wm.cost(wm.with_counts(policy, {**counts, n: down[n]}))
            options.append((n, after, (counts[n] - down[n]) / width[n]))
        enough = [o for o in options if o[1] <= budget]
        if enough:
            name, flops, _ = min(enough, key=lambda o: (o[2], o[0]))
        else:
            name, flops, _ = max(options, key=lambda o: ((flops - o[1]) / o[2], o[0]))
        counts[name] = down[name]
    return counts


# -- configuration ---------------------------------------------------------------------------

_CONFIG_KEYS = ("key_file", "message", "encoding", "n_bits", "delta", "bits_per_carrier", "max_shift", "alpha",
                "allocation", "projection")


@dataclass(frozen=True)
class WatermarkConfig:
    """What to embed and how. Non-secret except ``key`` (never printed, never written).

    ``message``: the owner's message; ``encoding="hash"`` embeds ``n_bits`` bits of its hash
    (``None``: the whole capacity), ``"raw"`` embeds its bytes (8 bits per byte).
    ``delta``: QIM step in ``round_to`` units (>= 2). ``bits_per_carrier``: fixed bits per
    carrier, or ``None`` to size them by channel count under ``max_shift`` (the largest
    projection move, as a fraction of a carrier's channels). ``alpha``: verification passes
    when the p-value is below it.

    ``allocation``: which groups carry the bits when ``n_bits`` is below the capacity
    (:data:`ALLOCATIONS`). ``projection``: which coset point a proposal is moved to
    (:data:`PROJECTIONS`); it decides what is evaluated, never how bits are read.
    """

    key_file: str | Path | None = None
    message: str | bytes | None = None
    encoding: str = "hash"
    n_bits: int | None = None
    delta: int = 2
    bits_per_carrier: int | None = None
    max_shift: float = 0.0625
    alpha: float = 1e-3
    allocation: str = "widest"
    projection: str = "capped"
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key is not None:
            raise ValueError("give the watermark key as key_file or key, not both")
        if self.key_file is not None and (not isinstance(self.key_file, (str, Path)) or not str(self.key_file)):
            raise ValueError(f"watermark key_file must be a path, got {self.key_file!r}")
        if self.key is not None and (not isinstance(self.key, bytes) or not self.key):
            raise ValueError("watermark key must be non-empty bytes")
        if self.message is not None and not isinstance(self.message, (str, bytes)):
            raise ValueError(f"watermark message must be a string or bytes, got {type(self.message).__name__}")
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"unknown watermark encoding {self.encoding!r} (known: {', '.join(sorted(_ENCODINGS))})")
        if self.n_bits is not None:
            if isinstance(self.n_bits, bool) or not isinstance(self.n_bits, int) or self.n_bits < 1:
                raise ValueError(f"watermark n_bits must be a positive integer or None, got {self.n_bits!r}")
            if self.encoding == "raw":
                raise ValueError("watermark n_bits is set by the message length with encoding 'raw'; leave it unset")
        if isinstance(self.delta, bool) or not isinstance(self.delta, int) or self.delta < 2:
            raise ValueError(f"watermark delta must be an integer >= 2 (channels per QIM step), got {self.delta!r}")
        if self.bits_per_carrier is not None and (
            isinstance(self.bits_per_carrier, bool)
            or not isinstance(self.bits_per_carrier, int)
            or not 1 <= self.bits_per_carrier <= MAX_BITS_PER_CARRIER
        ):
            raise ValueError(
                f"watermark bits_per_carrier must be None or an integer in [1, {MAX_BITS_PER_CARRIER}], "
                f"got {self.bits_per_carrier!r}"
            )
        if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, (int, float)) or not 0 < self.max_shift <= 0.5:
            raise ValueError(f"watermark max_shift must be in (0, 0.5], got {self.max_shift!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ValueError(f"watermark alpha must be in (0, 1), got {self.alpha!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"unknown watermark allocation {self.allocation!r} (known: {', '.join(sorted(ALLOCATIONS))})"
            )
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"unknown watermark projection {self.projection!r} (known: {', '.join(sorted(PROJECTIONS))})"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> "WatermarkConfig":
        """From a study config's ``[watermark]`` table; a relative key_file is taken from ``base_dir``.

        Unknown keys are errors; the key itself can only come from a file.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"[watermark] must be a table, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown [watermark] key(s): {', '.join(unknown)} (known: {', '.join(_CONFIG_KEYS)})")
        values = dict(data)
        key_file = values.get("key_file")
        if isinstance(key_file, str) and base_dir is not None and not Path(key_file).is_absolute():
            values["key_file"] = str(Path(base_dir) / key_file)
        return cls(**values)

    def load_key(self) -> bytes:
        """The key bytes (from ``key`` or ``key_file``); ``ValueError`` when neither is usable."""
        if self.key is not None:
            return self.key
        if self.key_file is None:
            raise ValueError("no watermark key given (set key_file)")
        return load_key(self.key_file)

    def message_bytes(self) -> bytes:
        if self.message is None or len(self.message) == 0:
            raise ValueError("watermark message is empty")
        return self.message.encode("utf-8") if isinstance(self.message, str) else bytes(self.message)

    def scheme(self) -> dict[str, Any]:
        """Non-secret parameters that decide the lattice (recorded in watermark.json)."""
        return {
            "encoding": self.encoding,
            "delta": self.delta,
            "bits_per_carrier": self.bits_per_carrier,
            "max_shift": self.max_shift,
            "allocation": self.allocation,
            "projection": self.projection,
        }


# -- capacity (key-independent) --------------------------------------------------------------


def _channels_of(groups: Sequence[ChannelGroup] | Mapping[str, int]) -> dict[str, int]:
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


def _unit_range(channels: int, ratio_min: float, ratio_max: float, round_to: int) -> tuple[int, int]:
    """Allowed kept counts of a group, in ``round_to`` units: [lo, hi] (may be empty)."""
    lo = max(math.ceil(ratio_min * channels - _EPS), 1, round_to)
    hi = min(math.floor(ratio_max * channels + _EPS), channels)
    return math.ceil(lo / round_to), hi // round_to


def _bits_for(channels: int, config: WatermarkConfig, ratio_min: float, ratio_max: float, round_to: int) -> int:
    ulo, uhi = _unit_range(channels, ratio_min, ratio_max, round_to)
    n_units = uhi - ulo + 1
    if config.bits_per_carrier is not None:
        b = config.bits_per_carrier
        # Why the full period must fit: then every symbol has a lattice point in range.
        return b if config.delta * 2**b <= n_units else 0
    budget = 2 * config.max_shift * channels / round_to  # period (units) allowed by max_shift
    best = 0
    for b in range(1, MAX_BITS_PER_CARRIER + 1):
        period = config.delta * 2**b
        if period <= n_units and period <= budget + _EPS:
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
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    channels = _channels_of(groups)
    bits = {n: _bits_for(c, config, ratio_min, ratio_max, round_to) for n, c in channels.items()}
    return Capacity(bits_per_group=bits, delta=config.delta, round_to=round_to)


def space_capacity(space: Any, config: WatermarkConfig) -> Capacity:
    """:func:`plan_capacity` with the groups, ratio range and rounding of a ``SearchSpace``."""
    return plan_capacity(
        space.groups, config, ratio_min=space.ratio_min, ratio_max=space.ratio_max, round_to=space.round_to
    )


# -- the watermark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Carrier:
    """One carrier group: its kept count encodes ``bits`` bits. Key-derived: keep private."""

    name: str
    channels: int
    bits: int
    delta: int  # QIM step, in round_to units
    dither: int  # in round_to units, uniform in [0, period)
    round_to: int
    unit_lo: int
    unit_hi: int

    @property
    def period(self) -> int:
        return self.delta * 2**self.bits

    def decode(self, kept: int) -> int:
        """Symbol nearest to ``kept`` (each symbol owns ``delta`` consecutive counts)."""
        v = (kept // self.round_to - self.dither) % self.period
        return ((v + self.delta // 2) // self.delta) % 2**self.bits

    def _coset(self, symbol: int) -> tuple[int, int]:
        """``symbol``'s lattice inside the range: its first point (round_to units) and last index."""
        residue = (self.dither + symbol * self.delta) % self.period
        first = self.unit_lo + (residue - self.unit_lo) % self.period
        return first, (self.unit_hi - first) // self.period

    def nearest(self, kept: int, symbol: int) -> int:
        """Kept count of ``symbol``'s coset inside the range, nearest to ``kept`` (ties: more channels)."""
        first, n = self._coset(symbol)
        u0 = kept / self.round_to
        j = min(max(round((u0 - first) / self.period), 0), n)
        candidates = [first + i * self.period for i in (j - 1, j, j + 1) if 0 <= i <= n]
        best = min(candidates, key=lambda u: (abs(u - u0), -u))
        return best * self.round_to

    def at_most(self, kept: int, symbol: int) -> int:
        """Largest count of ``symbol``'s coset in range that is <= ``kept`` (else the smallest)."""
        first, n = self._coset(symbol)
        j = min(max(math.floor((kept / self.round_to - first) / self.period + _EPS), 0), n)
        return (first + j * self.period) * self.round_to


def _gray(s: int) -> int:
    return s ^ (s >> 1)


def _gray_inverse(g: int) -> int:
    s = 0
    while g:
        s ^= g
        g >>= 1
    return s


def _symbol_bits(symbol: int, bits: int) -> list[int]:
    code = _gray(symbol)
    return [(code >> (bits - 1 - i)) & 1 for i in range(bits)]


def _bits_symbol(bits: Sequence[int]) -> int:
    code = 0
    for b in bits:
        code = (code << 1) | int(b)
    return _gray_inverse(code)


def binomial_p_value(matches: int, n: int) -> float:
    """P(Binomial(n, 1/2) >= matches): chance of that many matching bits without the mark."""
    if n <= 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(max(matches, 0), n + 1))
    return tail / 2**n


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


class Watermark:
    """A key + message laid onto the channel groups of one base architecture.

    ``channels``: the base architecture's groups (``ChannelGroup``s or name -> channels).
    ``ratio_min``/``ratio_max``/``round_to``: the search space's, so every projected count
    stays inside the space. Raises ``ValueError`` when the message does not fit.
    """

    def __init__(
        self,
        key: bytes,
        channels: Sequence[ChannelGroup] | Mapping[str, int],
        config: WatermarkConfig,
        *,
        ratio_min: float = 0.1,
        ratio_max: float = 1.0,
        round_to: int = 1,
        cost: Callable[[Policy], float] | None = None,
    ) -> None:
        if not isinstance(key, bytes) or not key:
            raise ValueError("watermark key must be non-empty bytes")
        self.config = config
        self.cost = cost  # policy -> FLOPs, for the "capped" projection
        self.channels: dict[str, int] = _channels_of(channels)
        self.ratio_min, self.ratio_max, self.round_to = float(ratio_min), float(ratio_max), round_to
        self.capacity_plan = plan_capacity(
            self.channels, config, ratio_min=ratio_min, ratio_max=ratio_max, round_to=round_to
        )
        message = config.message_bytes()
        n_bits = config.n_bits if config.encoding == "hash" else None
        if config.encoding == "hash" and n_bits is None:
            n_bits = self.capacity
        if self.capacity == 0:
            raise ValueError(
                f"watermark capacity is 0 bits: no group can carry a bit at delta {config.delta} "
                f"(ratio range [{ratio_min}, {ratio_max}], max_shift {config.max_shift}); "
                "lower delta or raise max_shift/bits_per_carrier"
            )
        self.bits: list[int] = _ENCODINGS[config.encoding](message, n_bits)
        if len(self.bits) > self.capacity:
            raise ValueError(
                f"watermark message needs {len(self.bits)} bits but the capacity is {self.capacity} bits "
                f"over {self.capacity_plan.eligible} carrier groups (delta {config.delta}); "
                "use a shorter message or fewer n_bits"
            )
        self._message_sha256 = hashlib.sha256(message).hexdigest()
        # Which groups carry how many bits: the allocation rule; their order in the bit
        # stream and tie-breaks are keyed.
        allocation = ALLOCATIONS[config.allocation](
            self.capacity_plan.bits_per_group, self.channels, len(self.bits), config.delta * round_to,
            lambda n: _prf(key, "order", n), config.bits_per_carrier is not None,
        )
        carriers: list[Carrier] = []
        total = 0
        for name, b in allocation.items():
            ulo, uhi = _unit_range(self.channels[name], self.ratio_min, self.ratio_max, round_to)
            period = config.delta * 2**b
            carriers.append(Carrier(
                name=name, channels=self.channels[name], bits=b, delta=config.delta,
                dither=_prf(key, "dither", name) % period, round_to=round_to, unit_lo=ulo, unit_hi=uhi,
            ))
            total += b
        self.carriers: tuple[Carrier, ...] = tuple(carriers)
        # The last carrier's unused bits get keyed padding (embedded, never counted).
        pad = [(_prf(key, "pad", carriers[-1].name) >> i) & 1 for i in range(total - len(self.bits))]
        stream = self.bits + pad
        self._symbols: dict[str, int] = {}
        pos = 0
        for c in carriers:
            self._symbols[c.name] = _bits_symbol(stream[pos : pos + c.bits])
            pos += c.bits
        log.info(
            "watermark: %d message bits on %d carrier groups (capacity %d bits)",
            len(self.bits), len(carriers), self.capacity,
        )

    @classmethod
    def from_space(cls, space: Any, config: WatermarkConfig, key: bytes | None = None) -> "Watermark":
        """Watermark over a ``SearchSpace``'s groups, ratio range and rounding (key from config)."""
        cost = None
        if getattr(space, "cost_model", None) is not None:
            def cost(policy: Policy) -> float:
                return float(space.predict_cost(policy).flops)
        return cls(
            key if key is not None else config.load_key(), space.groups, config,
            ratio_min=space.ratio_min, ratio_max=space.ratio_max, round_to=space.round_to, cost=cost,
        )

    # -- properties ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Bits the base architecture can carry under this scheme (all eligible groups)."""
        return self.capacity_plan.total

    @property
    def n_bits(self) -> int:
        return len(self.bits)

    @property
    def carrier_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.carriers)

    # -- embedding ---------------------------------------------------------------------------
    def target_counts(self, policy: Policy) -> dict[str, int]:
        """Kept count of every carrier after projecting ``policy``."""
        return PROJECTIONS[self.config.projection](self, policy)

    def proposed_count(self, carrier: Carrier, policy: Policy) -> int:
        return kept_channels(carrier.channels, policy.ratio(carrier.name), self.round_to)

    def symbol(self, carrier: Carrier) -> int:
        """The QIM symbol ``carrier`` must hold (key-derived: keep private)."""
        return self._symbols[carrier.name]

    def with_counts(self, policy: Policy, counts: Mapping[str, int]) -> Policy:
        """``policy`` with the named groups set to exactly ``counts`` channels (ratios ``k / channels``)."""
        ratios = dict(policy.ratios)
        for name, k in counts.items():
            if kept_channels(self.channels[name], policy.ratio(name), self.round_to) == k:
                continue  # already there: keep the proposal's own ratio
            ratio = k / self.channels[name]
            if kept_channels(self.channels[name], ratio, self.round_to) != k:  # pragma: no cover - float guard
                raise RuntimeError(f"ratio {ratio!r} does not give {k} channels of group {name!r}")
            ratios[name] = ratio
        return Policy(ratios=ratios, method=policy.method, recovery=policy.recovery)

    def project(self, policy: Policy) -> Policy:
        """The watermark-consistent policy the projection rule picks (default ``"capped"``: the
        nearest one whose FLOPs are no more than the proposal's): carriers moved onto their
        coset, others untouched.

        A carrier's ratio becomes exactly ``k / channels`` (off the search grid), which
        ``kept_channels`` maps back to ``k``. Idempotent.
        """
        unknown = [n for n in policy.ratios if n not in self.channels]
        if unknown:
            raise ValueError(f"unknown group name {unknown[0]!r} in policy (not in the watermarked architecture)")
        return self.with_counts(policy, self.target_counts(policy))

    def embed(self, policy: Policy) -> Policy:
        """Alias of :meth:`project`."""
        return self.project(policy)

    def is_consistent(self, policy: Policy) -> bool:
        """Whether ``policy`` already carries the mark exactly."""
        return self.extract(channel_counts_from_policy(policy, self.channels, self.round_to)) == self.bits

    # -- extraction ----------------------------------------------------------------------------
    def _check_counts(self, counts: Mapping[str, int]) -> None:
        for name in sorted(self.channels):
            if name not in counts:
                raise ValueError(
                    f"no channel count for group {name!r}: the model is not derived from this base architecture"
                )
            k, c = int(counts[name]), self.channels[name]
            if not 1 <= k <= c:
                raise ValueError(
                    f"group {name!r} has {k} channels, outside [1, {c}] of the base architecture"
                )

    def extract(self, channel_counts: Mapping[str, int]) -> list[int]:
        """The message bits read from kept channel counts (group name -> out channels)."""
        self._check_counts(channel_counts)
        stream: list[int] = []
        for c in self.carriers:
            stream += _symbol_bits(c.decode(int(channel_counts[c.name])), c.bits)
        return stream[: self.n_bits]

    def verify(self, channel_counts: Mapping[str, int], bits: Sequence[int] | None = None) -> VerifyResult:
        """BER and p-value of the extracted bits against ``bits`` (default: this message's)."""
        expected = list(self.bits if bits is None else bits)
        if len(expected) != self.n_bits:
            raise ValueError(f"expected {self.n_bits} bits to compare, got {len(expected)}")
        got = self.extract(channel_counts)
        matches = sum(int(a == b) for a, b in zip(got, expected))
        n = self.n_bits
        return VerifyResult(
            n_bits=n, matches=matches, ber=(n - matches) / n,
            p_value=binomial_p_value(matches, n), alpha=self.config.alpha,
        )

    # -- manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """What watermark.json records: never the key, never carrier names or dithers."""
        scheme = self.config.scheme()
        scheme.update(ratio_min=self.ratio_min, ratio_max=self.ratio_max, round_to=self.round_to)
        return {
            "format": MANIFEST_FORMAT,
            "version": SCHEME_VERSION,
            "bits": self.n_bits,
            "carriers": len(self.carriers),
            "capacity": self.capacity,
            "message_sha256": self._message_sha256,
            "scheme": scheme,
        }

    def manifest_mismatches(self, manifest: Mapping[str, Any]) -> list[str]:
        """Differences between an export's watermark.json and this watermark (empty: consistent)."""
        mine = self.manifest()
        problems = []
        for key in ("bits", "carriers", "capacity", "message_sha256"):
            if manifest.get(key) != mine[key]:
                problems.append(f"{key}: export has {manifest.get(key)!r}, expected {mine[key]!r}")
        theirs = manifest.get("scheme", {}) if isinstance(manifest.get("scheme"), Mapping) else {}
        for key, value in mine["scheme"].items():
            if key in _DECODING_IRRELEVANT:
                continue
            if theirs.get(key) != value:
                problems.append(f"scheme.{key}: export has {theirs.get(key)!r}, expected {value!r}")
        return problems


# -- reading channel counts ----------------------------------------------------------------------


def channel_counts_from_policy(
    policy: Policy, groups: Sequence[ChannelGroup] | Mapping[str, int], round_to: int = 1
) -> dict[str, int]:
    """Kept counts a policy asks for (no model built)."""
    return {n: kept_channels(c, policy.ratio(n), round_to) for n, c in _channels_of(groups).items()}


def channel_counts_from_model(model: nn.Module, groups: Sequence[ChannelGroup] | Mapping[str, int]) -> dict[str, int]:
    """Out channels of each group's root module in a (pruned) model."""
    modules = dict(model.named_modules())
    counts = {}
    for name in _channels_of(groups):
        if name not in modules:
            raise ValueError(f"model has no module {name!r}: not derived from this base architecture")
        counts[name] = out_channels(modules[name])
    return counts


def channel_counts_from_state_dict(
    state_dict: Mapping[str, Any], groups: Sequence[ChannelGroup] | Mapping[str, int]
) -> dict[str, int]:
    """Dim 0 of each group root's ``<name>.weight`` (conv/linear weights are out-channels first).

    Works on ``model.state_dict()``, a loaded ``weights.pt`` and ``ExportedProgram.state_dict``.
    """
    counts = {}
    for name in _channels_of(groups):
        weight = state_dict.get(f"{name}.weight")
        if weight is None or not hasattr(weight, "shape") or len(weight.shape) < 1:
            raise ValueError(f"no weight {name + '.weight'!r} in the state dict: not derived from this base architecture")
        counts[name] = int(weight.shape[0])
    return counts


def channel_counts_from_exported(program: Any, groups: Sequence[ChannelGroup] | Mapping[str, int]) -> dict[str, int]:
    """Counts from a ``torch.export.ExportedProgram`` (parameter shapes; constants as fallback)."""
    tensors: dict[str, Any] = dict(getattr(program, "constants", {}) or {})
    tensors.update(program.state_dict)
    return channel_counts_from_state_dict(tensors, groups)


def channel_counts_from_export_dir(
    directory: str | Path, groups: Sequence[ChannelGroup] | Mapping[str, int], *, trust_program: bool = False
) -> dict[str, int]:
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


__all__ = [
    "ALLOCATIONS", "PROJECTIONS", "Capacity", "Carrier", "VerifyResult", "Watermark", "WatermarkConfig", "binomial_p_value", "bits_to_bytes",
    "channel_counts_from_export_dir", "channel_counts_from_exported", "channel_counts_from_model",
    "channel_counts_from_policy", "channel_counts_from_state_dict", "load_key", "plan_capacity",
    "read_manifest", "register_allocation", "register_encoding", "register_projection", "space_capacity", "write_manifest",
]
