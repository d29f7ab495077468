"""QIM maths of the watermark: keyed pseudo-random numbers, a carrier's lattice of kept
counts (decode, nearest point, point at most), Gray-coded symbols, and the binomial test."""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass

from spaces.watermark_rules import DOMAIN

EPS = 1e-9


def prf(key: bytes, label: str, name: str) -> int:
    """Keyed pseudo-random 256-bit integer for (label, group name)."""
    msg = DOMAIN + b"\0" + label.encode() + b"\0" + name.encode()
    return int.from_bytes(hmac.new(key, msg, hashlib.sha256).digest(), "big")


def unit_range(channels: int, ratio_min: float, ratio_max: float, round_to: int) -> tuple[int, int]:
    """Allowed kept counts of a group, in ``round_to`` units: [lo, hi] (may be empty)."""
    lo = max(math.ceil(ratio_min * channels - EPS), 1, round_to)
    hi = min(math.floor(ratio_max * channels + EPS), channels)
    return math.ceil(lo / round_to), hi // round_to


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
        j = min(max(math.floor((kept / self.round_to - first) / self.period + EPS), 0), n)
        return (first + j * self.period) * self.round_to


def _gray(s: int) -> int:
    return s ^ (s >> 1)


def _gray_inverse(g: int) -> int:
    s = 0
    while g:
        s ^= g
        g >>= 1
    return s


def symbol_bits(symbol: int, bits: int) -> list[int]:
    """The ``bits`` bits of a symbol, Gray-coded (neighbouring symbols differ in one bit)."""
    code = _gray(symbol)
    return [(code >> (bits - 1 - i)) & 1 for i in range(bits)]


def bits_symbol(bits: Sequence[int]) -> int:
    """The symbol whose Gray code is ``bits`` (inverse of :func:`symbol_bits`)."""
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
