"""The watermark's pluggable rules: encodings, carrier allocations and projections registries."""

from __future__ import annotations

import pytest

from spaces.watermark_config import WatermarkConfig
from spaces.watermark_rules import (
    ALLOCATIONS,
    ENCODINGS,
    PROJECTIONS,
    bits_to_bytes,
    bytes_to_bits,
    register_allocation,
)


def test_builtin_rules_are_registered():
    assert ENCODINGS.names() == ("hash", "raw")
    assert ALLOCATIONS.names() == ("keyed", "widest")
    assert PROJECTIONS.names() == ("capped", "fewer", "nearest")


@pytest.mark.parametrize("field, registry", [("encoding", "encoding"), ("allocation", "allocation"),
                                             ("projection", "projection")])
def test_unknown_rule_names_are_one_line_errors_listing_the_known(field, registry):
    with pytest.raises(ValueError, match=rf"unknown watermark {registry} 'magic' \(known: ") as info:
        WatermarkConfig(message="m", **{field: "magic"})
    assert "\n" not in str(info.value)


def test_a_rule_name_registers_once():
    with pytest.raises(ValueError, match="watermark allocation 'widest' is already registered"):
        @register_allocation("widest")
        def other(max_bits, channels, n_bits, step, rank, fixed):  # noqa: ARG001
            return {}


def test_encodings():
    assert bits_to_bytes(ENCODINGS.get("raw")(b"(c) ACME", None)) == b"(c) ACME"
    hashed = ENCODINGS.get("hash")(b"(c) ACME", 20)
    assert len(hashed) == 20 and set(hashed) <= {0, 1} and hashed == ENCODINGS.get("hash")(b"(c) ACME", 20)
    assert hashed != ENCODINGS.get("hash")(b"(c) ACME!", 20)
    assert bytes_to_bits(b"\x80\x01") == [1] + [0] * 14 + [1]
    assert bits_to_bytes([1, 0, 1]) == b"\xa0"  # a partial byte is zero-padded


def _rank(name: str) -> int:
    return {"a": 2, "b": 0, "c": 1}[name]


def test_widest_puts_bits_where_a_period_is_the_smallest_share_of_the_group():
    max_bits, channels = {"a": 3, "b": 3, "c": 0}, {"a": 256, "b": 32, "c": 512}
    assert ALLOCATIONS.get("widest")(max_bits, channels, 3, 2, _rank, False) == {"a": 3}
    assert ALLOCATIONS.get("widest")(max_bits, channels, 5, 2, _rank, False) == {"b": 2, "a": 3}  # keyed order


def test_keyed_fills_groups_to_capacity_in_keyed_order():
    max_bits, channels = {"a": 3, "b": 2, "c": 2}, {"a": 256, "b": 32, "c": 64}
    assert ALLOCATIONS.get("keyed")(max_bits, channels, 3, 2, _rank, False) == {"b": 2, "c": 2}
