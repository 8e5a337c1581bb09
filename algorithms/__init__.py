"""Algorithms as plug-ins: name -> class (see base.Algorithm). Each algorithm module defines its class,
registered by an entry point of the group `ratebench.algorithms` (ratebench's own in its pyproject.toml, a
plug-in's in its own); ALGORITHMS discovers them on first use and stops with a message naming any that
fails to import (docs/architecture.md "Plug-ins and registries")."""
from __future__ import annotations

from ratebench.core.registry import Registry


def _refusal(plugin, cls) -> str | None:
    from ratebench.algorithms.base import Algorithm

    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        return f"names {cls!r}, not a subclass of ratebench.algorithms.base.Algorithm"
    if getattr(cls, "name", None) != plugin.name:
        return f"its class's name is {getattr(cls, 'name', None)!r}, not the entry point's name {plugin.name!r}"
    if getattr(getattr(cls, "Config", None), "name", None) != plugin.name:
        return f"its Config's name default is not {plugin.name!r}"
    return None


ALGORITHMS = Registry("algorithms", _refusal)  # name -> Algorithm subclass
