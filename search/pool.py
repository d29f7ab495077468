"""The evaluator pool as the driver uses it: a written protocol every pool conforms to.

``evaluators.pool.EvaluatorPool`` (Ray actors) is the product's pool; tests use
``tests.fakes.FakePool`` and the search-quality benchmark shares one pool between studies.
The driver calls nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from evaluators.metrics import Metrics
from evaluators.settings import EvalSettings
from spaces.policy import Policy


@runtime_checkable
class Pool(Protocol):
    """Evaluates policies asynchronously; results come back tagged with what was submitted.

    * ``submit(policy, tag, settings)`` queues one evaluation (``settings`` ``None``: the
      pool's own); it never blocks on the evaluation.
    * ``results(timeout)`` waits up to ``timeout`` seconds for at least one finished
      evaluation and returns every finished one as ``(tag, policy, metrics)``; a failed
      evaluation is a ``Metrics`` with ``error``, never an exception.
    * ``capacity`` is how many evaluations the driver keeps submitted at once;
      ``in_flight`` how many are submitted and not yet returned.
    * ``close()`` releases the workers; the pool is not used afterwards.
    """

    @property
    def capacity(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    def submit(self, policy: Policy, tag: Any = None, settings: EvalSettings | None = None) -> None: ...

    def results(self, timeout: float | None = None) -> list[tuple[Any, Policy, Metrics]]: ...

    def close(self) -> None: ...
