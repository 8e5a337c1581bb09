"""A claim's experiment from the harness's side: what `ratebench run -m experiment=<name>` resolves
to (the configs its jobs get, composed by Hydra; analysis/evidence.py compares runs against them) and
running it, or reusing its finished runs, under a work folder (`ratebench check` without --runs)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ratebench.analysis import evidence, judgement
from ratebench.analysis.claims import Claim
from ratebench.analysis.evidence import ExperimentConfigs
from ratebench.analysis.inputs import CONF_DIR, BadInput
from ratebench.core.records import code_fingerprint
from ratebench.core.registry import conf_folders, files, find_file

MAX_SWEEP_JOBS = 256  # expected configs composed per experiment; a larger discrete sweep frees its swept keys


@functools.lru_cache(maxsize=64)
def experiment_configs(name: str) -> ExperimentConfigs:
    """The expected resolved configs of experiment `name`, composed by Hydra as `ratebench run -m
    experiment=<name>` composes each job (the sweep's discrete values expanded, free keys left out).
    A name that is not a file in conf/experiment/ (runs tagged by hand) has none: ExperimentConfigs(None)."""
    from omegaconf import OmegaConf
    from ratebench.config import compose

    if not EXPERIMENT_NAME.fullmatch(name) or name.startswith(".") or not experiment_file(name).exists():
        return ExperimentConfigs(None, evidence.ALWAYS_FREE)
    where = f"{experiment_file(name)}"
    try:
        with_hydra = compose([f"experiment={name}"], with_hydra=True)
        base = compose([f"experiment={name}"])
    except Exception as exc:  # noqa: BLE001 (Hydra raises several types: all mean the preset does not compose)
        raise BadInput(f"{where}: cannot compose experiment {name!r} ({type(exc).__name__}: {exc})") from None
    declared = [str(k) if isinstance(k, str) else k for k in (base.get("free_keys") or [])]
    flat_base = evidence.expected_flat(OmegaConf.to_container(base, resolve=True))
    unknown = [k for k in declared if not isinstance(k, str)
               or not any(key == k or key.startswith(k + ".") for key in flat_base)]
    if unknown:
        raise BadInput(f"{where}: free_keys: {unknown} name no key of the experiment's config; list dotted keys "
                       f"such as budget.samples or algorithm.lr_exponent")
    free = tuple(evidence.ALWAYS_FREE) + tuple(declared)
    node = OmegaConf.select(with_hydra, "hydra.sweeper.params", default=None)
    params = {str(k): str(v) for k, v in node.items_ex(resolve=False)} if node is not None else {}
    combos, continuous = evidence.sweep_combinations(params, free)
    if len(combos) > MAX_SWEEP_JOBS:
        continuous += [k for k in params if not evidence.is_free(k, free)]
        combos = [[]]
    free += tuple(continuous)
    configs = [flat_base if not combo else
               evidence.expected_flat(OmegaConf.to_container(compose([f"experiment={name}", *combo]), resolve=True))
               for combo in combos]
    tuning = frozenset(int(i) for c in configs for i in json.loads(c.get("tuning_instances") or "[]"))
    # the defaults of the experiment's algorithm and env alone: a run from before a key existed matches where the
    # experiment keeps that key's default (evidence.config_differences)
    groups = [f"algorithm={flat_base['algorithm.name']}", f"env={flat_base['env.name']}"]
    defaults = evidence.expected_flat(OmegaConf.to_container(compose(groups), resolve=True))
    return ExperimentConfigs(tuple(configs), free, tuning, defaults)


EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def experiment_dir(workdir: Path, experiment: str) -> Path:
    """One folder per experiment: claims that share an experiment share its runs."""
    return Path(workdir) / experiment


def experiment_file(name: str) -> Path:
    """experiment/<name>.yaml in the conf folder that has it (ratebench's, a plug-in's, a claim file's own);
    a path that does not exist when none has it."""
    return find_file("experiment", name) or CONF_DIR / "experiment" / f"{name}.yaml"


def check_experiment_name(claim: Claim) -> None:
    """The experiment must be a shipped preset named without path parts (it names a folder)."""
    known = sorted({p.stem for p in files("experiment")})
    for key, name in (("experiment", claim.experiment), ("baseline_experiment", claim.baseline_experiment)):
        if name is None:
            continue
        if not EXPERIMENT_NAME.fullmatch(name) or name.startswith(".") or not experiment_file(name).exists():
            folders = ", ".join(str(f / "experiment") for f in conf_folders())
            raise BadInput(f"{claim.path}: {key}: no experiment {name!r} in {folders}; "
                           f"allowed: {', '.join(known)}")


def experiment_digest(name: str) -> str:
    """What a finished sweep's marker records: the experiment file and the result-producing code.
    Either changing means the runs must be re-made (the sweep itself skips jobs that are still valid)."""
    from ratebench.code_identity import installed_plugins_hash

    plugins = installed_plugins_hash().encode()  # empty without plug-ins: the digest of ratebench alone
    return hashlib.sha256(experiment_file(name).read_bytes() + code_fingerprint().encode() + plugins).hexdigest()[:16]


class RunFailed(Exception):
    """A `ratebench run` that check started exited with `code` (never 1: runs do not return verdicts)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def ensure_experiment(experiment: str, workdir: Path, claim_ids: list[str]) -> Path:
    """Run `ratebench run -m experiment=<name>` into workdir/<name> unless a finished sweep of the
    same experiment file and code is there (marker .complete holds their hash)."""
    out = experiment_dir(workdir, experiment)
    digest = experiment_digest(experiment)
    marker = out / ".complete"
    label = ",".join(claim_ids)
    if marker.exists() and marker.read_text().strip() == digest:
        print(f"[{label}] reusing finished runs of experiment {experiment} in {out}", file=sys.stderr)
        return out
    cmd = [sys.executable, "-c", "import sys; from ratebench.cli import main; sys.exit(main())",
           "run", "-m", f"experiment={experiment}", f"hydra.sweep.dir={out}"]
    print(f"[{label}] running: ratebench run -m experiment={experiment} hydra.sweep.dir={out}", file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:  # the run's own status: 2 bad input, 3 internal error, 130/143 a signal
        raise RunFailed(result.returncode, f"[{label}] `ratebench run -m experiment={experiment}` exited "
                                           f"{result.returncode}")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    return out


def claim_evidence(loaded, claim: Claim, where: str = "the runs", free: tuple = ()):
    """judgement.claim_evidence against what the claim's experiment resolves to now."""
    return judgement.claim_evidence(loaded, claim, experiment_configs(claim.experiment), where, free)


def evaluate_claim(loaded, claim: Claim, opts, where: str = "the runs", free: tuple = ()):
    """judgement.evaluate_claim against what the claim's experiment (and a difference claim's
    baseline_experiment) resolves to now: (verdict, curves, note)."""
    baseline = experiment_configs(claim.baseline_experiment) if claim.baseline_experiment else None
    return judgement.evaluate_claim(loaded, claim, opts, experiment_configs(claim.experiment), where, free, baseline)

