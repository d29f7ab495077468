"""What can be proposed and what it costs: channel groups, policies, search spaces, costs."""

from spaces.cost import Cost, CostModel, count_cost
from spaces.groups import ChannelGroup, discover_groups
from spaces.policy import Policy
from spaces.space import SearchSpace, kept_channels

__all__ = [
    "ChannelGroup", "Cost", "CostModel", "Policy", "SearchSpace", "count_cost", "discover_groups", "kept_channels",
]
