"""Finite environments with exact evaluation. `make(cfg)` builds one from its config.

Add an environment: a module with a config dataclass (subclass of CommonEnvConfig) and a
`build(cfg) -> TabularProblem`, registered in ENVIRONMENTS, plus `conf/env/<name>.yaml`.
"""
from __future__ import annotations

from ratebench.envs import bandit, mdp, token
from ratebench.envs.tabular import TabularProblem
from ratebench.errors import ConfigError

ENVIRONMENTS = {
    "bandit": (bandit.BanditConfig, bandit.build),
    "mdp": (mdp.MDPConfig, mdp.build),
    "token": (token.TokenConfig, token.build),
}


def make(cfg) -> TabularProblem:
    """Build the environment named by cfg.name (a dataclass or DictConfig with its knobs)."""
    if cfg.name not in ENVIRONMENTS:
        raise ConfigError("env", f"unknown environment {cfg.name!r}; allowed: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[cfg.name][1](cfg)
