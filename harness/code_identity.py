"""The code that produced a run: ratebench's version, commit and source fingerprint, and for each plug-in
the run uses (its algorithm, its environment) the distribution's version and a hash of its source files.
The run hash covers the plug-ins' source hashes, so a changed plug-in never reuses an old result."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ratebench.core.registry import Plugin

SOURCE_SUFFIXES = (".py", ".c", ".yaml")  # what a plug-in's results can depend on


def source_files(module: str) -> list[tuple[str, Path]]:
    """(name relative to the package, path) of the source files of the top-level package (or single-file
    module) that `module` belongs to, found without importing it."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
        return []
    roots = [Path(r) for r in spec.submodule_search_locations or []]
    if not roots:
        return [(Path(spec.origin).name, Path(spec.origin))] if spec.origin and Path(spec.origin).is_file() else []
    return sorted((str(p.relative_to(root)), p) for root in roots for p in root.rglob("*")
                  if p.suffix in SOURCE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts)


def source_hash(module: str) -> str:
    """sha256 (16 hex digits) of the source files of module's top-level package: names and contents."""
    digest = hashlib.sha256()
    for name, path in source_files(module):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def plugin_identity(plugin: Plugin) -> dict:
    return {"kind": plugin.kind, "name": plugin.name, "entry_point": plugin.value,
            "distribution": plugin.distribution, "version": plugin.version, "source_hash": source_hash(plugin.module)}


def used_plugins(algorithm: str, env: str) -> list[Plugin]:
    """The plug-ins (not ratebench's own) that a run of this algorithm and environment executes."""
    from ratebench.algorithms import ALGORITHMS
    from ratebench.envs import ENVIRONMENTS

    found = [ALGORITHMS.plugin(algorithm), ENVIRONMENTS.plugin(env)]
    return [p for p in found if not p.builtin]


def plugin_sources(algorithm: str, env: str) -> dict:
    """{"<kind>:<name>": source hash} of the plug-ins a run uses: what the run hash adds to the config."""
    return {f"{p.kind}:{p.name}": source_hash(p.module) for p in used_plugins(algorithm, env)}


def run_code(algorithm: str, env: str) -> dict:
    """run.json's `provenance.code`: ratebench's version, commit and fingerprint; the plug-ins' identities."""
    import ratebench
    from ratebench.core.records import code_fingerprint, git_commit

    return {"ratebench": {"version": ratebench.__version__, "commit": git_commit(with_dirty=True),
                          "fingerprint": code_fingerprint()},
            "plugins": [plugin_identity(p) for p in used_plugins(algorithm, env)]}


def installed_plugins_hash() -> str:
    """One hash of every installed algorithm and environment plug-in's source (ratebench's own excluded):
    what a finished experiment sweep's marker adds (a changed plug-in re-checks the sweep's jobs)."""
    from ratebench.core.registry import plugins

    parts = sorted(f"{p.kind}:{p.name}:{source_hash(p.module)}" for kind in ("algorithms", "envs")
                   for p in plugins(kind) if not p.builtin)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16] if parts else ""
