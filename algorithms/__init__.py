"""Algorithms as plug-ins: name -> class (see base.Algorithm). Each module in _MODULES
defines `ALGORITHM = <class>`; a module not written yet is simply absent."""
from __future__ import annotations

import importlib

_MODULES = ("reward_mle", "bilevel", "dpo", "ppo_rlhf", "softmax_pg", "npg")


def _discover() -> dict:
    found = {}
    for module in _MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module}":
                continue
            raise
        found[mod.ALGORITHM.name] = mod.ALGORITHM
    return found


ALGORITHMS = _discover()
