"""The written pool protocol (search.pool.Pool): every pool the driver is given conforms."""

from __future__ import annotations

import inspect

import pytest

from evaluators.pool import EvaluatorPool
from search.pool import Pool
from tests.fakes import FakePool, tiny_space

MEMBERS = sorted(n for n in vars(Pool) if not n.startswith("_"))


def mismatches(cls: type) -> list[str]:
    """How ``cls`` departs from ``Pool``: missing members, properties that are not
    properties, methods without the protocol's parameters (by name, in order)."""
    problems = []
    for name in MEMBERS:
        wanted, got = inspect.getattr_static(Pool, name), inspect.getattr_static(cls, name, None)
        if got is None:
            problems.append(f"{name} missing")
        elif isinstance(wanted, property) != isinstance(got, property):
            problems.append(f"{name} is {'not ' if isinstance(wanted, property) else ''}a property")
        elif not isinstance(wanted, property):
            params = list(inspect.signature(wanted).parameters)
            have = list(inspect.signature(got).parameters)
            if have[: len(params)] != params:
                problems.append(f"{name}{tuple(have)} does not take {tuple(params)}")
    return problems


def test_the_protocol_names_what_the_driver_uses():
    assert MEMBERS == ["capacity", "close", "in_flight", "results", "submit"]


@pytest.mark.parametrize("cls", [EvaluatorPool, FakePool], ids=lambda c: c.__name__)
def test_pools_conform(cls):
    assert mismatches(cls) == []


def test_a_fake_pool_is_a_pool():
    assert isinstance(FakePool(tiny_space()), Pool)


def test_a_class_missing_a_member_is_reported():
    class Half:
        capacity = 1

        def submit(self, policy):
            pass

    assert set(mismatches(Half)) == {"capacity is not a property", "close missing", "in_flight missing",
                                     "results missing", "submit('self', 'policy') does not take "
                                     "('self', 'policy', 'tag', 'settings')"}
