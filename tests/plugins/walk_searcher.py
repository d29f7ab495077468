"""A searcher in one file: uniform policies walking down the ratio grid, one per proposal.

Each proposal records in ``meta["told"]`` how many outcomes it had been told by then, so a
test can see that the driver reports outcomes back.
"""

from __future__ import annotations

from search.base import Outcome, Proposal, Searcher, register_searcher


@register_searcher("ext_walk")
class UniformWalk(Searcher):
    """Every group at the same ratio, from the top of the grid down, then round again."""

    def __init__(self, context, options=None) -> None:
        super().__init__(context, options)
        self.asked = 0
        self.told: list[Outcome] = []

    def ask(self, n: int) -> list[Proposal]:
        levels = sorted(self.space.levels, reverse=True)
        out = []
        for _ in range(n):
            ratio = levels[self.asked % len(levels)]
            out.append(Proposal(self.space.uniform(ratio), meta={"told": len(self.told)}))
            self.asked += 1
        return out

    def tell(self, outcome: Outcome) -> None:
        self.told.append(outcome)
