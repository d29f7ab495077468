"""The pluggable rules of the watermark scheme, each a :class:`~spaces.registry.Registry`:

* message **encodings** (:data:`ENCODINGS`): message bytes, ``n_bits`` -> the bits to embed;
* carrier **allocations** (:data:`ALLOCATIONS`): which eligible groups carry how many bits;
* **projections** (:data:`PROJECTIONS`): which coset point each carrier of a proposal moves to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from spaces.policy import Policy
from spaces.registry import Registry

if TYPE_CHECKING:
    from spaces.watermark import Watermark

DOMAIN = b"prunesearch-watermark/v1"

# -- message encodings ----------------------------------------------------------------------
Encoding = Callable[[bytes, "int | None"], list[int]]
ENCODINGS: Registry[Encoding] = Registry("watermark encoding")


def register_encoding(name: str) -> Callable[[Encoding], Encoding]:
    """Decorator adding a watermark encoding ``fn(message: bytes, n_bits: int | None) -> bits``."""
    return ENCODINGS.register(name)


def bytes_to_bits(data: bytes) -> list[int]:
    """The bits of ``data``, MSB first."""
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
    if n_bits is None:
        raise ValueError("watermark encoding 'hash' needs n_bits")
    digest = hashlib.shake_256(DOMAIN + b"/message\0" + message).digest((n_bits + 7) // 8)
    return bytes_to_bits(digest)[:n_bits]


@register_encoding("raw")
def _raw_bits(message: bytes, n_bits: int | None) -> list[int]:
    """The message's own bytes, 8 bits each (recoverable with :func:`bits_to_bytes`)."""
    return bytes_to_bits(message)


# -- carrier allocation -----------------------------------------------------------------------
# An allocation gets each group's maximum bits (key-independent), channels, the bits to
# place, the QIM step in channels, a keyed rank per group and ``fixed`` (bits_per_carrier
# is set: a carrier takes all its bits or none); it returns {group: bits} for the carriers,
# in bit-stream order. Total bits may exceed ``n_bits`` only when ``fixed`` (keyed padding).
Allocation = Callable[[Mapping[str, int], Mapping[str, int], int, int, Callable[[str], int], bool], dict[str, int]]
ALLOCATIONS: Registry[Allocation] = Registry("watermark allocation")


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    """Decorator adding a watermark carrier allocation rule under ``name``."""
    return ALLOCATIONS.register(name)


@register_allocation("keyed")
def _allocate_keyed(max_bits, channels, n_bits, step, rank, fixed):
    """Eligible groups in keyed order, each filled to its maximum, until the message fits
    (a narrow group may carry its full capacity while wide ones stay free)."""
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


# -- projection rules -------------------------------------------------------------------------
# A rule gets the watermark and the proposal and returns every carrier's kept count; each
# count must be a lattice point of the carrier's symbol inside the range.
Projection = Callable[["Watermark", Policy], dict[str, int]]
PROJECTIONS: Registry[Projection] = Registry("watermark projection")


def register_projection(name: str) -> Callable[[Projection], Projection]:
    """Decorator adding a watermark projection rule ``fn(watermark, proposal) -> {carrier: kept}``."""
    return PROJECTIONS.register(name)


@register_projection("nearest")
def _project_nearest(wm: Watermark, policy: Policy) -> dict[str, int]:
    """Each carrier to its symbol's lattice point nearest to the proposal (ties: more channels)."""
    return {c.name: c.nearest(wm.proposed_count(c, policy), wm.symbol(c)) for c in wm.carriers}


@register_projection("fewer")
def _project_fewer(wm: Watermark, policy: Policy) -> dict[str, int]:
    """Each carrier to its symbol's largest lattice point not above the proposal (the lowest
    in range when none is): costs only fall, but a carrier may lose up to a period - 1."""
    return {c.name: c.at_most(wm.proposed_count(c, policy), wm.symbol(c)) for c in wm.carriers}


@register_projection("capped")
def _project_capped(wm: Watermark, policy: Policy) -> dict[str, int]:
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
