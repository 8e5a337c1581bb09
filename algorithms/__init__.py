"""Algorithms as plug-ins: name -> (config dataclass, class). See base.Algorithm."""
from __future__ import annotations

from ratebench.algorithms.reward_mle import RewardMLE

ALGORITHMS = {cls.name: cls for cls in (RewardMLE,)}
