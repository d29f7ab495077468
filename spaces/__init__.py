"""What can be proposed and what it costs: channel groups, policies, search spaces, costs,
latency tables and the structural watermark."""

from spaces.cost import Cost, CostModel, count_cost
from spaces.groups import ChannelGroup, discover_groups
from spaces.latency import LatencyTable, predict_latency_ms
from spaces.policy import Policy
from spaces.space import SearchSpace, SpaceConfig, kept_channels
from spaces.watermark import VerifyResult, Watermark, WatermarkConfig, load_key, space_capacity

__all__ = [
    "ChannelGroup", "Cost", "CostModel", "LatencyTable", "Policy", "SearchSpace", "SpaceConfig", "VerifyResult",
    "Watermark", "WatermarkConfig", "count_cost", "discover_groups", "kept_channels",
    "load_key", "predict_latency_ms", "space_capacity",
]
