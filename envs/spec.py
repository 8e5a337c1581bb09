"""The environment contract: what an environment module exports as `SPEC`, the one declaration the
environment registry (ratebench.envs.ENVIRONMENTS) reads. docs/architecture.md "Plug-ins and registries"."""
from __future__ import annotations

from typing import Callable, NamedTuple

from ratebench.envs.tabular import TabularProblem


class EnvSpec(NamedTuple):
    """An environment, whole:

    - Config: a dataclass subclassing envs.common.CommonEnvConfig; its `name` default is the name the
      environment is registered under (its entry point's name), and every field is a documented knob.
    - check(cfg): every size and range check from the config alone (ConfigError naming `env.<field>`),
      before any tensor is built.
    - build(cfg) -> TabularProblem: the problem, deterministic in cfg (its instance_seed draws it).
    - sizes(cfg) -> (reward units, trajectory pairs of exact evaluation, horizon), from the config alone:
      the harness's memory estimate reads it before any compute.
    """

    Config: type
    check: Callable[[object], None]
    build: Callable[[object], TabularProblem]
    sizes: Callable[[object], tuple[int, int, int]]


def spec_refusal(name: str, spec: object) -> str | None:
    """Why `spec` is not an EnvSpec registered under `name` (or None)."""
    if not isinstance(spec, EnvSpec):
        return f"names a {type(spec).__name__}, not an envs.spec.EnvSpec (Config, check, build, sizes)"
    default = getattr(spec.Config, "name", None)
    if default != name:
        return f"its Config's name is {default!r}, not the entry point's name {name!r}"
    return None
