"""Policy: what to keep of each channel group, and how to choose which channels.

A policy is plain data. ``ratios`` are *remaining* fractions in (0, 1] per group name;
groups not named keep everything (1.0). ``method`` is the importance criterion used to
rank channels, either one name for the whole model or a mapping group -> name.
``recovery`` optionally overrides the task's recovery method for this policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from spaces.checks import check_number, check_str


def _check_ratio(name: str, ratio: Any) -> float:
    ratio = check_number(f"ratio for group {name!r}", ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio for group {name!r} must be in (0, 1], got {ratio!r}")
    return ratio


@dataclass(frozen=True)
class Policy:
    """Per-group remaining ratios plus the channel-ranking method (and optional recovery)."""

    ratios: Mapping[str, float] = field(default_factory=dict)
    method: str | Mapping[str, str] = "l1"
    recovery: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ratios, Mapping):
            raise ValueError(f"ratios must be a mapping of group name -> ratio, got {self.ratios!r}")
        ratios = {str(k): _check_ratio(str(k), v) for k, v in self.ratios.items()}
        object.__setattr__(self, "ratios", MappingProxyType(dict(sorted(ratios.items()))))
        if isinstance(self.method, Mapping):
            methods = {str(k): v for k, v in self.method.items()}
            for group, name in methods.items():
                check_str(f"method for group {group!r}", name)
            object.__setattr__(self, "method", MappingProxyType(dict(sorted(methods.items()))))
        else:
            check_str("method (a name, or a mapping group -> name)", self.method)
        if self.recovery is not None:
            check_str("recovery (or None)", self.recovery)

    # -- accessors -------------------------------------------------------------------------
    def ratio(self, group: str) -> float:
        """Remaining ratio of ``group`` (1.0 when the policy does not name it)."""
        return self.ratios.get(group, 1.0)

    def method_for(self, group: str, default: str = "l1") -> str:
        """Importance criterion used for ``group``."""
        if isinstance(self.method, Mapping):
            return self.method.get(group, default)
        return self.method

    def methods_used(self) -> set[str]:
        return set(self.method.values()) if isinstance(self.method, Mapping) else {self.method}

    def validate(self, group_names: Iterable[str], methods: Iterable[str] | None = None) -> None:
        """Raise ``ValueError`` naming the first unknown group or method."""
        known = set(group_names)
        for name in self.ratios:
            if name not in known:
                raise ValueError(f"unknown group name {name!r} (known: {', '.join(sorted(known)) or 'none'})")
        if isinstance(self.method, Mapping):
            for name in self.method:
                if name not in known:
                    raise ValueError(f"unknown group name {name!r} in per-group method")
        if methods is not None:
            allowed = set(methods)
            for name in sorted(self.methods_used()):
                if name not in allowed:
                    raise ValueError(f"unknown method {name!r} (allowed: {', '.join(sorted(allowed))})")

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        method = dict(self.method) if isinstance(self.method, Mapping) else self.method
        out: dict[str, Any] = {"ratios": dict(self.ratios), "method": method}
        if self.recovery is not None:
            out["recovery"] = self.recovery
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal policies give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        if not isinstance(data, Mapping):
            raise ValueError(f"a policy must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"ratios", "method", "recovery"}
        if unknown:
            raise ValueError(f"unknown policy key(s): {', '.join(sorted(unknown))}")
        return cls(ratios=data.get("ratios", {}), method=data.get("method", "l1"), recovery=data.get("recovery"))

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"policy is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def key(self) -> str:
        """Hashable identity used to detect duplicate proposals."""
        return self.to_json()

    def __hash__(self) -> int:  # MappingProxyType is unhashable; hash the canonical form
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_json() == other.to_json()

    def __reduce__(self):  # MappingProxyType cannot be pickled (Ray ships policies)
        return (Policy.from_dict, (self.to_dict(),))
