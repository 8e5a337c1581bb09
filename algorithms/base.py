"""What an algorithm is to the harness: how to initialise and how to take one step.

The harness owns the loop, counters, clock, evaluation schedule and records. An algorithm
draws samples only through the CountingSampler it is handed and never evaluates or logs.
It exposes its deployed policy and reward estimate as tables/models so the harness can score
them exactly.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ratebench.algorithms.models import Params, RewardModel
from ratebench.envs.tabular import TabularProblem


class Algorithm:
    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg: Any, model_cfg: Any, problem: TabularProblem):
        self.cfg, self.model_cfg, self.problem = cfg, model_cfg, problem

    def init(self, seeds: list[int]) -> Any:
        """Initial state for a batch of seeds (parameters stacked on a leading seed axis)."""
        raise NotImplementedError

    def step(self, state: Any, sampler) -> Any:
        """One outer iteration; returns the new state."""
        raise NotImplementedError

    def policy_log_probs(self, state: Any) -> list[torch.Tensor]:
        """The deployed policy as per-step log-prob tables [(B, n_h, A)]."""
        raise NotImplementedError

    def reward_model(self, state: Any) -> tuple[RewardModel, Params] | None:
        """(model, parameters nu) of the reward estimate, or None if no nu exists."""
        return None

    def implicit_rewards(self, state: Any) -> list[torch.Tensor] | None:
        """Step reward tables of an implicit reward estimate (e.g. DPO's beta log pi/pi_ref)."""
        return None

    def schedule(self, state: Any) -> dict[str, float]:
        """Step sizes / penalty actually used at the last step, for the records."""
        return {}

    def tensors(self, state: Any) -> dict[str, torch.Tensor]:
        """Every per-seed tensor of the state (leading axis B), for divergence checks and
        checkpoints. The harness may overwrite slices of diverged seeds in place."""
        raise NotImplementedError
