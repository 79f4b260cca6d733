"""`strategy=none`: full multi-task SFT, the papers' first baseline."""

from epi.strategies.base import Strategy


class NoIsolation(Strategy):
    """Full multi-task SFT: nothing is isolated."""

    name = "none"  # the registry name: conf/strategy/none.yaml
    shardable = True  # it reads no tensor
