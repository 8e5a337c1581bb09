"""The global reference F* (and F_loc) per environment instance and reward class, computed once by
envs/global_ref.py and cached on disk keyed by the env config and the reward bound (model.reward.bound);
entries are validated on read."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import warnings
from pathlib import Path

import torch

import ratebench.envs
from ratebench.envs.exact import bilevel_objective
from ratebench.envs.global_ref import GlobalReference, class_start, global_reference, to_units
from ratebench.core.cache import cache_dir
from ratebench.core.records import atomic_write_json, config_hash, sources_fingerprint

EXACT_VERSION = 3  # bump when the exact objective or the reference changes (2: global reference; 3: box faces also
# searched from a fixed grid, which can only lower a bounded F*), so old entries are not reused
ORDER_SLACK = 1e-9  # f_star <= f_star_local <= F(nu_true) up to this


def true_objective(problem, reward_bound: float | None = None) -> float:
    """F(nu_true): the bilevel objective of the true reward; with a reward bound, of the class's point where
    F_loc starts (the true reward clipped into the box, envs/global_ref.py: class_start)."""
    with torch.no_grad():
        if reward_bound is None:
            return float(bilevel_objective(problem, problem.true_step_tables())[0])
        units = to_units(class_start(problem, reward_bound), reward_bound)[None]
        return float(bilevel_objective(problem, problem.step_tables_from_units(units))[0])


def entry_problem(entry: dict, n_units: int, f_true: float) -> str | None:
    """Why a cache entry cannot be used, or None: finite values, argmins of the right size and
    f_star <= f_star_local <= F(nu_true) + ORDER_SLACK."""
    try:
        value, local = float(entry["f_star"]), float(entry["f_star_local"])
        sizes = {len(entry["argmin"]), len(entry["local_argmin"])}
        str(entry["method"]), int(entry["n_minima"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if not (math.isfinite(value) and math.isfinite(local)):
        return f"non-finite values f_star={value}, f_star_local={local}"
    if sizes != {n_units}:
        return f"argmin sizes {sorted(sizes)} != n_units={n_units}"
    if not value <= local + ORDER_SLACK or not local <= f_true + ORDER_SLACK:
        return f"order violated: f_star={value:.9g}, f_star_local={local:.9g}, F(nu_true)={f_true:.9g}"
    return None


def to_entry(ref: GlobalReference, env_config: dict) -> dict:
    return {"f_star": ref.value, "argmin": ref.argmin.tolist(), "method": ref.method, "n_minima": ref.n_minima,
            "f_star_local": ref.local_value, "local_argmin": ref.local_argmin.tolist(),
            "minima_per_group": list(ref.minima_per_group), "env": env_config, "reward_bound": ref.reward_bound}


def from_entry(entry: dict) -> GlobalReference:
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float64)
    return GlobalReference(float(entry["f_star"]), as_tensor(entry["argmin"]), str(entry["method"]),
                           int(entry["n_minima"]), float(entry["f_star_local"]), as_tensor(entry["local_argmin"]),
                           list(entry.get("minima_per_group", [])), entry.get("reward_bound"))


def cache_key(env_config: dict, reward_bound: float | None = None) -> str:
    """The cache entry's key: the env config, EXACT_VERSION and, when set, the reward bound (the class F* is over)."""
    keyed = {"env": env_config, "exact_version": EXACT_VERSION}
    if reward_bound is not None:
        keyed["reward_bound"] = float(reward_bound)
    return config_hash(keyed)


def entry_path(env_config: dict, directory: str | None = None, reward_bound: float | None = None) -> Path:
    """The cache entry of this env config's GlobalReference over the reward class (it may not exist yet)."""
    return cache_dir(directory) / f"fstar-{cache_key(env_config, reward_bound)}.json"


def reference(problem, env_config: dict, directory: str | None = None,
              reward_bound: float | None = None) -> GlobalReference:
    """The GlobalReference of this env config over the reward class (reward_bound: None, or R for tabular
    rewards in [-R, R]), from the cache when a valid entry exists. Jobs that need the same entry at once
    (a sweep's workers on one instance, parallel test workers) take an exclusive lock on it, so one
    computes it and the others read its result."""
    path = entry_path(env_config, directory, reward_bound)
    with _entry_lock(path):
        return _reference(problem, env_config, path, reward_bound)


@contextlib.contextmanager
def _entry_lock(path: Path):
    """flock on `<entry>.lock` next to the entry; without a writable cache folder, no lock (and no cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, also if the process dies
        yield


def _reference(problem, env_config: dict, path: Path, reward_bound: float | None = None) -> GlobalReference:
    f_true = true_objective(problem, reward_bound)
    if path.exists():
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            entry, why = None, f"unreadable ({exc})"
        else:
            why = entry_problem(entry, problem.n_units, f_true) if isinstance(entry, dict) else "not a JSON object"
            if why is None and entry.get("reward_bound") != reward_bound:
                why = f"reward_bound {entry.get('reward_bound')!r} != {reward_bound!r}"
        if why is None:
            return from_entry(entry)
        warnings.warn(f"recomputing the global reference: cache entry {path} is invalid: {why}", stacklevel=2)
    ref = global_reference(problem, seed=env_config.get("instance_seed", 0), bound=reward_bound)
    why = entry_problem(to_entry(ref, env_config), problem.n_units, f_true)
    if why is not None:
        raise RuntimeError(f"global reference of {env_config.get('name')}: {why}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, to_entry(ref, env_config))
    except OSError as exc:  # the cache saves time, it is not a result: run on without it
        warnings.warn(f"cannot cache the global reference in {path}: {exc.strerror or exc}", stacklevel=2)
    return ref


class MinPsiStore:
    """min psi_lam entries (envs/penalty.py PsiReference) on disk in the cache folder, beside F-hat*'s: one JSON file
    per (env config, reward class, lam, the solve's start points, the envs package's sources), each written whole
    (atomic_write_json). A solve is a pure function of that key, so an entry holds exactly the numbers the solve
    would return (JSON keeps float64 exactly) and a run reads the same bits with or without it."""

    def __init__(self, env_config: dict, directory: str | None = None):
        self.folder = cache_dir(directory)
        self.keyed = {"env": env_config, "envs_sources": sources_fingerprint(ratebench.envs.__path__)}

    def path(self, lam: float, starts: list[torch.Tensor], bound: float | None) -> Path:
        starts_hash = hashlib.sha256(b"".join(s.detach().to(torch.float64).contiguous().numpy().tobytes()
                                              for s in starts)).hexdigest()
        key = config_hash({**self.keyed, "lam": float(lam).hex(), "reward_bound": bound, "starts": starts_hash})
        return self.folder / f"minpsi-{key}.json"

    def get(self, lam: float, starts: list[torch.Tensor], bound: float | None, n_units: int):
        """(min psi_lam, its argmin unit rewards) of a valid entry, or None (none, unreadable or malformed)."""
        try:
            entry = json.loads(self.path(lam, starts, bound).read_text())
            value, argmin = float(entry["value"]), torch.tensor(entry["argmin"], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not math.isfinite(value) or argmin.shape != (n_units,) or not bool(torch.isfinite(argmin).all()):
            return None
        return value, argmin

    def put(self, lam: float, starts: list[torch.Tensor], bound: float | None, value: float,
            argmin: torch.Tensor) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path(lam, starts, bound), {"value": value, "argmin": argmin.tolist(),
                                                              "lam": lam, "reward_bound": bound})
        except OSError:  # the cache saves time, it is not a result: run on without it
            pass


def f_star(problem, env_config: dict, directory: str | None = None,
           reward_bound: float | None = None) -> tuple[float, torch.Tensor]:
    """(F*, its argmin unit rewards): the global reference's value, for callers that need only that."""
    ref = reference(problem, env_config, directory, reward_bound)
    return ref.value, ref.argmin
