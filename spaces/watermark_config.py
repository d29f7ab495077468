"""What to embed and how: :class:`WatermarkConfig` (the ``[watermark]`` table) and the key file."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spaces.checks import check_int, check_number
from spaces.watermark_rules import ALLOCATIONS, ENCODINGS, PROJECTIONS

log = logging.getLogger(__name__)

MAX_BITS_PER_CARRIER = 8
_CONFIG_KEYS = ("key_file", "message", "encoding", "n_bits", "delta", "bits_per_carrier", "max_shift", "alpha",
                "allocation", "projection")


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
    (:data:`~spaces.watermark_rules.ALLOCATIONS`). ``projection``: which coset point a
    proposal is moved to (:data:`~spaces.watermark_rules.PROJECTIONS`); it decides what is
    evaluated, never how bits are read.
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
        ENCODINGS.get(self.encoding)
        if self.n_bits is not None:
            check_int("watermark n_bits", self.n_bits, 1)
            if self.encoding == "raw":
                raise ValueError("watermark n_bits is set by the message length with encoding 'raw'; leave it unset")
        check_int("watermark delta (channels per QIM step)", self.delta, 2)
        if self.bits_per_carrier is not None:
            check_int("watermark bits_per_carrier", self.bits_per_carrier, 1, MAX_BITS_PER_CARRIER)
        check_number("watermark max_shift", self.max_shift, maximum=0.5, positive=True)
        check_number("watermark alpha", self.alpha, positive=True)
        if self.alpha >= 1:
            raise ValueError(f"watermark alpha must be in (0, 1), got {self.alpha!r}")
        ALLOCATIONS.get(self.allocation)
        PROJECTIONS.get(self.projection)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> WatermarkConfig:
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
