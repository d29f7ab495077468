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
  free; ``"keyed"`` fills eligible groups to capacity in keyed order. The
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

Cost: a projection moves a carrier by up to half a period (``delta * 2**bits / 2``
channels), and the accuracy that costs grows with the move relative to the layer; so embed
only the bits the p-value needs (``n_bits``), spread over the widest groups, and project
with the cap.

The key is never written anywhere: :func:`write_manifest` records bit count, carrier count,
capacity, the non-secret scheme parameters and SHA-256 of the message.

Typical use::

    config = WatermarkConfig(key_file="owner.key", message="(c) ACME 2025")
    wm = Watermark.from_space(space, config)          # ValueError: bad key / too long
    policy = wm.project(proposal)                     # every evaluated policy is marked
    ...
    result = wm.verify(channel_counts_from_model(pruned, space.groups))
    result.passed, result.ber, result.p_value

The pieces live in modules of one job each, re-exported here: the rule registries
(``watermark_rules``), the config and key file (``watermark_config``), the QIM lattice
(``watermark_qim``), capacity planning (``watermark_capacity``) and read-out, verification
and the manifest (``watermark_readout``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spaces.groups import ChannelGroup
from spaces.policy import Policy
from spaces.space import kept_channels
from spaces.watermark_capacity import Capacity, channels_of, plan_capacity, space_capacity
from spaces.watermark_config import MAX_BITS_PER_CARRIER, WatermarkConfig, load_key
from spaces.watermark_qim import Carrier, binomial_p_value, bits_symbol, prf, symbol_bits, unit_range
from spaces.watermark_readout import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    VerifyResult,
    channel_counts_from_export_dir,
    channel_counts_from_exported,
    channel_counts_from_model,
    channel_counts_from_policy,
    channel_counts_from_state_dict,
    read_manifest,
    write_manifest,
)
from spaces.watermark_rules import (
    ALLOCATIONS,
    ENCODINGS,
    PROJECTIONS,
    bits_to_bytes,
    register_allocation,
    register_encoding,
    register_projection,
)

log = logging.getLogger(__name__)

SCHEME_VERSION = 2  # recorded in watermark.json; the scheme names its allocation and projection rules
# Scheme fields that change what is evaluated but not how a model's bits are read.
_DECODING_IRRELEVANT = frozenset({"projection"})


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
        self.channels: dict[str, int] = channels_of(channels)
        self.ratio_min, self.ratio_max, self.round_to = float(ratio_min), float(ratio_max), round_to
        self.capacity_plan = plan_capacity(
            self.channels, config, ratio_min=ratio_min, ratio_max=ratio_max, round_to=round_to
        )
        message = config.message_bytes()
        self.bits: list[int] = self._message_bits(message)
        self._message_sha256 = hashlib.sha256(message).hexdigest()
        self.carriers: tuple[Carrier, ...] = self._place_carriers(key)
        self._symbols: dict[str, int] = self._carrier_symbols(key)
        log.info(
            "watermark: %d message bits on %d carrier groups (capacity %d bits)",
            len(self.bits), len(self.carriers), self.capacity,
        )

    def _message_bits(self, message: bytes) -> list[int]:
        """The bits to embed; ``ValueError`` when the capacity is 0 or too small for them."""
        config = self.config
        n_bits = config.n_bits if config.encoding == "hash" else None
        if config.encoding == "hash" and n_bits is None:
            n_bits = self.capacity
        if self.capacity == 0:
            raise ValueError(
                f"watermark capacity is 0 bits: no group can carry a bit at delta {config.delta} "
                f"(ratio range [{self.ratio_min}, {self.ratio_max}], max_shift {config.max_shift}); "
                "lower delta or raise max_shift/bits_per_carrier"
            )
        bits = ENCODINGS.get(config.encoding)(message, n_bits)
        if len(bits) > self.capacity:
            raise ValueError(
                f"watermark message needs {len(bits)} bits but the capacity is {self.capacity} bits "
                f"over {self.capacity_plan.eligible} carrier groups (delta {config.delta}); "
                "use a shorter message or fewer n_bits"
            )
        return bits

    def _place_carriers(self, key: bytes) -> tuple[Carrier, ...]:
        """The carriers in bit-stream order: which groups and how many bits by the allocation
        rule; their order and tie-breaks, and each carrier's dither, keyed."""
        delta, round_to = self.config.delta, self.round_to
        allocation = ALLOCATIONS.get(self.config.allocation)(
            self.capacity_plan.bits_per_group, self.channels, len(self.bits), delta * round_to,
            lambda n: prf(key, "order", n), self.config.bits_per_carrier is not None,
        )
        carriers = []
        for name, b in allocation.items():
            ulo, uhi = unit_range(self.channels[name], self.ratio_min, self.ratio_max, round_to)
            carriers.append(Carrier(
                name=name, channels=self.channels[name], bits=b, delta=delta,
                dither=prf(key, "dither", name) % (delta * 2**b), round_to=round_to, unit_lo=ulo, unit_hi=uhi,
            ))
        return tuple(carriers)

    def _carrier_symbols(self, key: bytes) -> dict[str, int]:
        """The QIM symbol of every carrier: the message bits in carrier order, the last
        carrier's unused bits filled with keyed padding (embedded, never counted)."""
        total = sum(c.bits for c in self.carriers)
        pad = [(prf(key, "pad", self.carriers[-1].name) >> i) & 1 for i in range(total - len(self.bits))]
        stream = self.bits + pad
        symbols: dict[str, int] = {}
        pos = 0
        for c in self.carriers:
            symbols[c.name] = bits_symbol(stream[pos : pos + c.bits])
            pos += c.bits
        return symbols

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
        return PROJECTIONS.get(self.config.projection)(self, policy)

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
            stream += symbol_bits(c.decode(int(channel_counts[c.name])), c.bits)
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


__all__ = [
    "ALLOCATIONS", "ENCODINGS", "MANIFEST_FORMAT", "MANIFEST_NAME", "MAX_BITS_PER_CARRIER", "PROJECTIONS",
    "SCHEME_VERSION", "Capacity", "Carrier", "VerifyResult", "Watermark", "WatermarkConfig", "binomial_p_value",
    "bits_to_bytes", "channel_counts_from_export_dir", "channel_counts_from_exported", "channel_counts_from_model",
    "channel_counts_from_policy", "channel_counts_from_state_dict", "load_key", "plan_capacity", "read_manifest",
    "register_allocation", "register_encoding", "register_projection", "space_capacity", "write_manifest",
]
