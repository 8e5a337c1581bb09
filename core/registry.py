"""Plug-ins found by Python entry points: one registry per kind, the built-ins declared the same way.

A distribution declares in its pyproject.toml

    [project.entry-points."ratebench.algorithms"]
    polsgd = "mypkg.polsgd:PolicySGD"          # an Algorithm subclass whose `name` is "polsgd"
    [project.entry-points."ratebench.envs"]
    ring = "mypkg.ring:SPEC"                   # an envs.spec.EnvSpec whose Config's `name` is "ring"
    [project.entry-points."ratebench.claims"]
    mypkg = "mypkg.conf"                       # a package folder with claims/, experiment/ (and algorithm/, env/)

and ratebench finds them in every process that imports it (a sweep's launcher workers included: they
read the same installed metadata). ratebench's own algorithms, environments and conf/ are declared in
its own pyproject.toml, so every run goes through this mechanism. A plug-in that fails to import, names
a missing object or clashes with another's name stops the process with a message naming it: a typo
never drops an algorithm silently. This module imports nothing of ratebench but its errors.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ratebench.core.errors import ConfigError

GROUPS = {"algorithms": "ratebench.algorithms", "envs": "ratebench.envs", "claims": "ratebench.claims"}
HOME = "ratebench"  # the distribution whose entry points are the built-ins
CONF_PATH_ENV = "RATEBENCH_CONF_PATH"  # extra conf folders (os.pathsep-separated): claims/, experiment/, ...


class PluginError(ConfigError):
    """A plug-in that cannot be loaded (import error, missing object, wrong kind, clashing name)."""

    def __init__(self, where: str, message: str):
        super().__init__(where, message)


@dataclass(frozen=True)
class Plugin:
    """One entry point of a kind: where it comes from and what it names."""

    kind: str
    name: str
    value: str  # "module:attr" or "module"
    distribution: str | None  # None: found without distribution metadata
    version: str | None

    @property
    def module(self) -> str:
        return self.value.split(":", 1)[0].strip()

    @property
    def builtin(self) -> bool:
        return self.distribution == HOME

    @property
    def where(self) -> str:
        return f"entry point {self.name} = {self.value!r} of {self.distribution or 'an unknown distribution'}"


def plugins(kind: str) -> list[Plugin]:
    """The declared entry points of a kind (GROUPS): ratebench's own first, then the others by name. The same
    (name, value) declared twice (one distribution found twice on sys.path) counts once; two different
    values under one name are a PluginError naming both. Read once per sys.path (the metadata scan takes ms)."""
    return list(_plugins(kind, tuple(sys.path)))


@functools.lru_cache(maxsize=16)
def _plugins(kind: str, path: tuple) -> tuple[Plugin, ...]:
    group = GROUPS[kind]
    found: dict[str, Plugin] = {}
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        plugin = Plugin(kind, ep.name, ep.value, dist.name if dist else None, dist.version if dist else None)
        other = found.get(ep.name)
        if other is not None and other.value != plugin.value:
            raise PluginError(f"plug-in {group}:{ep.name}", f"declared twice: {other.where} and {plugin.where}; "
                                                           f"uninstall one or rename its entry point")
        found.setdefault(ep.name, plugin)
    if not any(p.builtin for p in found.values()):
        raise PluginError(f"plug-in {group}", f"ratebench's installed metadata declares no {group} entry points "
                                              f"(an install older than its pyproject.toml): reinstall it, e.g. "
                                              f"pip install -e <ratebench checkout>")
    return tuple(sorted(found.values(), key=lambda p: (not p.builtin, p.name)))


def load(plugin: Plugin) -> Any:
    """The object an entry point names, imported now; any failure is a PluginError naming the plug-in."""
    module, _, attr = plugin.value.partition(":")
    try:
        obj = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001  (whatever the plug-in raises while importing: name it, then stop)
        raise PluginError(f"plug-in {GROUPS[plugin.kind]}:{plugin.name}",
                          f"{plugin.where} failed to load: {type(exc).__name__}: {exc}") from exc
    return obj


class Registry(Mapping):
    """name -> object of one kind, discovered on first use (not at import: a plug-in module may import
    ratebench's own package of that kind). `check(plugin, obj)` returns why obj is not a valid plug-in of
    the kind (or None); an invalid one is a PluginError."""

    def __init__(self, kind: str, check: Callable[[Plugin, Any], str | None]):
        self.kind, self._check = kind, check
        self._items: dict[str, Any] | None = None
        self._plugins: dict[str, Plugin] = {}

    def _loaded(self) -> dict[str, Any]:
        if self._items is None:
            items, sources = {}, {}
            for plugin in plugins(self.kind):
                obj = load(plugin)
                why = self._check(plugin, obj)
                if why:
                    raise PluginError(f"plug-in {GROUPS[self.kind]}:{plugin.name}", f"{plugin.where}: {why}")
                items[plugin.name], sources[plugin.name] = obj, plugin
            self._items, self._plugins = items, sources
        return self._items

    def __getitem__(self, name: str) -> Any:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {sorted(self._loaded())})"

    def plugin(self, name: str) -> Plugin:
        """Where `name` comes from (its distribution and entry point)."""
        self._loaded()
        return self._plugins[name]


def conf_folders() -> list[Path]:
    """The conf folders whose claims/ and experiment/ (and algorithm/, env/ presets) ratebench reads, in
    the order Hydra searches them: ratebench's own conf/, the `ratebench.claims` plug-ins, then the
    folders of $RATEBENCH_CONF_PATH (set by `check` for a claim file given by path, inherited by its run)."""
    return list(_unique_folders(_plugin_folders(tuple(sys.path)), os.environ.get(CONF_PATH_ENV, ""), os.getcwd()))


@functools.lru_cache(maxsize=64)
def _unique_folders(plugin_folders: tuple, extra: str, cwd: str) -> tuple[Path, ...]:
    """The plug-ins' folders then $RATEBENCH_CONF_PATH's (relative ones against cwd), each real folder once (the
    first name it is given by). Kept per (sys.path, $RATEBENCH_CONF_PATH, cwd): every compose, preset lookup and
    claim search asks, and a Path.resolve is an lstat per component (a process whose variable grew to 16 folders
    spent ~7 ms a call resolving them)."""
    folders = list(plugin_folders) + [Path(cwd, text.strip()) for text in extra.split(os.pathsep) if text.strip()]
    unique, seen = [], set()
    for folder in folders:
        real = folder.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(folder)
    return tuple(unique)


@functools.lru_cache(maxsize=16)
def _plugin_folders(path: tuple) -> tuple[Path, ...]:
    folders = []
    for plugin in plugins("claims"):
        spec = importlib.util.find_spec(plugin.module)
        if spec is None:
            raise PluginError(f"plug-in {GROUPS['claims']}:{plugin.name}",
                              f"{plugin.where}: no module {plugin.module!r}")
        where = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
        folders.append(Path(where[0]))
    return tuple(folders)


def add_conf_folder(folder: Path) -> None:
    """Read claims and experiments from `folder` too, in this process and the processes it starts."""
    current = [p for p in os.environ.get(CONF_PATH_ENV, "").split(os.pathsep) if p]
    text = str(Path(folder).absolute())
    if text not in current:
        os.environ[CONF_PATH_ENV] = os.pathsep.join(current + [text])


def search_path() -> list[str]:
    """hydra.searchpath (conf/config.yaml): every conf folder but ratebench's own (Hydra's primary one)."""
    return [f"file://{folder}" for folder in conf_folders()[1:]]  # none is the first one again (conf_folders)


def files(subfolder: str) -> list[Path]:
    """Every <conf folder>/<subfolder>/*.yaml, by folder order then name."""
    return [p for folder in conf_folders() for p in sorted((folder / subfolder).glob("*.yaml"))]


def find_file(subfolder: str, name: str) -> Path | None:
    """<conf folder>/<subfolder>/<name>.yaml in the one folder that has it, None in none; a name two folders
    define is a PluginError (which would Hydra read?)."""
    hits = [path for path in (folder / subfolder / f"{name}.yaml" for folder in conf_folders()) if path.is_file()]
    if len(hits) > 1:
        raise PluginError(subfolder, f"{name!r} is defined in {len(hits)} conf folders ({', '.join(map(str, hits))}); "
                                     f"rename one")
    return hits[0] if hits else None


def claim_conf_folder(claim_path: Path) -> Path:
    """The conf folder a claim file given by path belongs to: the parent of its `claims/` folder (where its
    `experiment/` folder is), else its own folder."""
    folder = Path(claim_path).absolute().parent
    return folder.parent if folder.name == "claims" else folder
