"""Finite environments with exact evaluation. `make(cfg)` builds one from its config.

An environment is a module exporting `SPEC = EnvSpec(Config, check, build, sizes)` (envs/spec.py),
registered by an entry point of the group `ratebench.envs` (ratebench's own in its pyproject.toml, a
plug-in's in its own), plus a preset `env/<name>.yaml` in a conf folder. ENVIRONMENTS discovers them on
first use (docs/architecture.md "Plug-ins and registries").
"""
from __future__ import annotations

from ratebench.envs.spec import EnvSpec, spec_refusal
from ratebench.envs.tabular import TabularProblem
from ratebench.core.errors import ConfigError
from ratebench.core.registry import Registry

ENVIRONMENTS = Registry("envs", lambda plugin, spec: spec_refusal(plugin.name, spec))  # name -> EnvSpec


def spec(name: str) -> EnvSpec:
    """The EnvSpec registered as `name` (ConfigError naming the allowed ones when there is none)."""
    if name not in ENVIRONMENTS:
        raise ConfigError("env", f"unknown environment {name!r}; allowed: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]


def sizes(cfg) -> tuple[int, int, int]:
    """(reward units, trajectory pairs of exact evaluation, horizon) of an env config."""
    return spec(cfg.name).sizes(cfg)


def make(cfg) -> TabularProblem:
    """Build the environment named by cfg.name (a dataclass or DictConfig with its knobs)."""
    return spec(cfg.name).build(cfg)
