"""Finite environments with exact evaluation. `make(cfg)` builds one from its config.

Add an environment: a module with a config dataclass (subclass of CommonEnvConfig), a
`check(cfg)` that validates from the config alone, and `build(cfg) -> TabularProblem`,
registered in ENVIRONMENTS, plus `conf/env/<name>.yaml`.
"""
from __future__ import annotations

from ratebench.envs import bandit, mdp, token
from ratebench.envs.tabular import TabularProblem
from ratebench.core.errors import ConfigError

ENVIRONMENTS = {  # name -> (config dataclass, check, build)
    "bandit": (bandit.BanditConfig, bandit.check, bandit.build),
    "mdp": (mdp.MDPConfig, mdp.check, mdp.build),
    "token": (token.TokenConfig, token.check, token.build),
}


def sizes(cfg) -> tuple[int, int, int]:
    """(reward units, trajectory pairs of exact evaluation, horizon) of an env config (a known name)."""
    return {"bandit": bandit, "mdp": mdp, "token": token}[cfg.name].sizes(cfg)


def make(cfg) -> TabularProblem:
    """Build the environment named by cfg.name (a dataclass or DictConfig with its knobs)."""
    if cfg.name not in ENVIRONMENTS:
        raise ConfigError("env", f"unknown environment {cfg.name!r}; allowed: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[cfg.name][2](cfg)
