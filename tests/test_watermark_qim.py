"""QIM maths: keyed numbers, a carrier's lattice (decode, nearest, at_most), Gray symbols, p-values."""

from __future__ import annotations

import math

import pytest

from spaces.watermark_qim import Carrier, binomial_p_value, bits_symbol, prf, symbol_bits, unit_range


def carrier(bits=2, delta=2, dither=3, round_to=1, channels=64, lo=6, hi=64) -> Carrier:
    return Carrier(name="g", channels=channels, bits=bits, delta=delta, dither=dither, round_to=round_to,
                   unit_lo=lo, unit_hi=hi)


def test_prf_is_keyed_and_labelled():
    assert prf(b"k", "dither", "a") == prf(b"k", "dither", "a")
    assert len({prf(b"k", "dither", "a"), prf(b"j", "dither", "a"), prf(b"k", "order", "a"),
                prf(b"k", "dither", "b")}) == 4


def test_unit_range_respects_ratio_range_and_rounding():
    assert unit_range(64, 0.1, 1.0, 1) == (7, 64)
    assert unit_range(64, 0.1, 1.0, 4) == (2, 16)   # 8..64 channels in steps of 4
    assert unit_range(3, 0.1, 1.0, 8) == (1, 0)     # empty: not even one unit fits


@pytest.mark.parametrize("bits", range(1, 6))
def test_gray_symbols_round_trip_and_neighbours_differ_in_one_bit(bits):
    for s in range(2**bits):
        assert bits_symbol(symbol_bits(s, bits)) == s
        if s:
            assert sum(a != b for a, b in zip(symbol_bits(s, bits), symbol_bits(s - 1, bits))) == 1


@pytest.mark.parametrize("delta, round_to", [(2, 1), (3, 1), (2, 4)])
def test_projected_points_decode_to_their_symbol_within_the_margin(delta, round_to):
    c = carrier(delta=delta, round_to=round_to, lo=2, hi=64 // round_to)
    for symbol in range(2**c.bits):
        for kept in range(2 * round_to, 65, round_to):
            point = c.nearest(kept, symbol)
            assert c.unit_lo * round_to <= point <= c.unit_hi * round_to and point % round_to == 0
            assert c.decode(point) == symbol
            assert abs(point - kept) <= c.period * round_to  # never more than a period away
            assert c.decode(point - round_to) == symbol  # one unit fewer never flips a bit
            if delta >= 3:
                assert c.decode(point + round_to) == symbol


def test_at_most_never_goes_above_the_proposal_unless_at_the_range_end():
    c = carrier()
    for symbol in range(4):
        for kept in range(6, 65):
            point = c.at_most(kept, symbol)
            assert c.decode(point) == symbol
            assert point <= kept or point < 6 + c.period


def test_binomial_p_value():
    assert binomial_p_value(0, 10) == 1.0
    assert binomial_p_value(10, 10) == 2**-10
    assert math.isclose(binomial_p_value(5, 10), sum(math.comb(10, i) for i in range(5, 11)) / 1024)
    assert binomial_p_value(3, 0) == 1.0
