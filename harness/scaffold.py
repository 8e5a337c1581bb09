"""`ratebench init DIR`: a repository that uses ratebench from outside: a package whose example algorithm is
registered through the `ratebench.algorithms` entry point and whose conf folder (an experiment and a claim
about the algorithm) through `ratebench.claims`, a test, a README with two commands and a GitHub Actions
workflow (install, run the claim's experiment, check, cache the runs keyed by config and code, upload the
report). It passes its own test and its own check as written (tests/test_plugins_e2e.py runs both)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

USAGE = """usage: ratebench init DIR [--name PACKAGE]

Write a new repository into DIR (which must not exist or be empty): a Python package PACKAGE (default: DIR's
name) with an example algorithm `<PACKAGE>_pg` registered as a ratebench plug-in, an experiment and a claim
about it, a test, a README and a GitHub Actions workflow. Then: cd DIR && pip install -e . && ratebench check
<PACKAGE>_pg_bandit"""

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{pkg}"
version = "0.1.0"
description = "{algo}: an algorithm whose convergence-rate claim ratebench checks"
requires-python = ">=3.11"
dependencies = ["ratebench[dist]"]  # dist: the joblib launcher the experiment sweeps with

[project.optional-dependencies]
dev = ["pytest>=8"]

# what ratebench finds in every process (its sweep workers included): the algorithm class, and the folder
# holding the experiment and the claim (conf/claims/, conf/experiment/, conf/algorithm/)
[project.entry-points."ratebench.algorithms"]
{algo} = "{pkg}.algorithm:PolicyGradient"

[project.entry-points."ratebench.claims"]
{pkg} = "{pkg}.conf"

[tool.setuptools]
packages = ["{pkg}", "{pkg}.conf"]

[tool.setuptools.package-data]
"{pkg}.conf" = ["*.yaml", "**/*.yaml"]
'''

ALGORITHM = '''"""{algo}: softmax policy gradient ascent with exact gradients, deploying the mean of its iterates.

    J(theta) = E_pi_theta[ sum_h r_h - beta log pi_theta / pi_ref ],   theta_{{t+1}} = theta_t + lr grad J(theta_t),
    deployed: softmax(mean(theta_1 .. theta_t))

one logit per (step, state, action), started at log pi_ref + init_scale N(0, 1) per seed. With beta > 0 the
iterates converge geometrically to the maximiser pi* ∝ pi_ref exp(r / beta); their average lags by the sum of
the early deviations over t, so the deployed gap J* - J falls like 1/t^2: reaching a gap eps takes order
eps^-1/2 steps, which the claim in conf/claims/ bounds by eps^-1. Replace the step with your own algorithm;
ratebench owns the loop, the counters and the exact evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.models import sgd_step
from ratebench.envs import exact
from ratebench.envs.tabular import DTYPE
from ratebench.core.errors import ConfigError


@dataclass
class PolicyGradientConfig:
    name: str = "{algo}"
    lr: float = 5.0  # step size of the gradient ascent (chosen on instance 0 of the experiment)
    init_scale: float = 0.5  # theta_0 = log pi_ref + init_scale N(0, 1), each seed its own draw

    def check(self) -> None:
        if not self.lr > 0:
            raise ConfigError("algorithm.lr", f"must be > 0, got {{self.lr}}")
        if not self.init_scale >= 0:
            raise ConfigError("algorithm.init_scale", f"must be >= 0, got {{self.init_scale}}")


@dataclass
class PolicyGradientState:
    theta: list[torch.Tensor]  # per step (seeds, states, actions): the logits
    average: list[torch.Tensor]  # the mean of theta over the steps taken: the deployed policy's logits
    t: int = 0


class PolicyGradient(Algorithm):
    name = "{algo}"
    Config = PolicyGradientConfig

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.true = problem.true_step_tables()  # the true reward: this example draws no samples

    def init(self, seeds):
        def noise(shape, seed, h):  # each seed its own draw, whatever the batch
            return torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1000 * seed + h))

        theta = [step.ref_logp[None] + self.cfg.init_scale * torch.stack([noise(step.ref_logp.shape, s, h)
                                                                           for s in seeds])
                 for h, step in enumerate(self.problem.steps)]
        return PolicyGradientState(theta=theta, average=[t.clone() for t in theta])

    def reference_step(self, state, sampler):
        def value(theta):  # J(theta) per seed, by exact backward evaluation
            return exact.policy_value(self.problem, self.true, [torch.log_softmax(t, -1) for t in theta])

        state.theta = sgd_step(state.theta, value, -self.cfg.lr)  # a negative step ascends
        state.t += 1
        state.average = [a + (t - a) / state.t for a, t in zip(state.average, state.theta)]
        return state

    def policy_log_probs(self, state):
        return [torch.log_softmax(a, -1) for a in state.average]

    def implicit_rewards(self, state):
        """Its reward estimate: the true reward it optimises (the reward metrics read it)."""
        B = state.theta[0].shape[0]
        return [r.expand(B, *r.shape[1:]) for r in self.true]
'''

ALGORITHM_PRESET = '''# {algo}: softmax policy gradient ascent with exact gradients ({pkg}/algorithm.py)
defaults:
  - {algo}_schema

name: {algo}
'''

EXPERIMENT = '''# @package _global_
# {algo} on the bandit: 2 held-out instances (instance_seed 1, 2) x 4 seeds, 20000 exact-gradient steps each, one
# job per instance on the joblib launcher. Instance 0 chose lr, the budget and the claim's eps range
# (tuning_instances: never evidence).
#   ratebench run -m experiment={algo}_bandit hydra.sweep.dir=ratebench-runs/{algo}_bandit
defaults:
  - override /env: bandit
  - override /algorithm: {algo}
  - override /hydra/launcher: joblib

n_seeds: 4
budget:
  steps: 20000
  evals_per_decade: 20
tuning_instances: [0]
hydra:
  mode: MULTIRUN
  launcher:
    n_jobs: 2
  sweeper:
    params:
      env.instance_seed: 1,2
'''

CLAIM = '''# The gap of {algo} falls at least like 1/t: reaching policy_gap eps takes at most order eps^-1 steps. (Its
# gap falls geometrically, so the fitted exponent is far below 1 on the small eps where it is measured.)
id: {algo}_bandit
source: "{pkg}: exact softmax policy gradient on a KL-regularised bandit converges at least at rate 1/t"
algorithm: {algo}
env: bandit
experiment: {algo}_bandit
metric: policy_gap
x: step
exponent: 1.0
relation: upper_bound
epsilon:
  unit: policy_gap
  min: 1.0e-5          # instance 0: policy_gap ~ 1/t^2 below ~5e-4 (t > ~400), 1e-5 at t ~ 3000
  max: 3.0e-4
min_seeds: 4
instances: 2           # held-out instances 1-2 (0 tuned: conf/experiment/{algo}_bandit.yaml)
'''

TEST = '''"""{algo}'s iterates reach the closed-form optimum of the KL-regularised bandit, pi* ∝ pi_ref exp(r / beta)."""
import torch

from {pkg}.algorithm import PolicyGradient
from ratebench.algorithms import ALGORITHMS
from ratebench.envs import ENVIRONMENTS


def test_registered_through_the_entry_point():
    assert ALGORITHMS["{algo}"] is PolicyGradient


def test_reaches_the_closed_form_optimum():
    spec = ENVIRONMENTS["bandit"]
    problem = spec.build(spec.Config(n_contexts=3, n_actions=4, instance_seed=5))
    algo = PolicyGradient(PolicyGradient.Config(), None, problem)
    state = algo.init([0, 1])
    for _ in range(3000):
        state = algo.step(state, None)
    reward = problem.true_step_tables()[0][0]  # (contexts, actions)
    optimum = torch.log_softmax(problem.steps[0].ref_logp + reward / problem.beta, -1)
    assert torch.allclose(torch.log_softmax(state.theta[0], -1), optimum.expand(2, -1, -1), atol=1e-6)
    # the deployed average lags by (sum of the early deviations) / t
    lag = (torch.log_softmax(state.average[0], -1) - optimum).abs().max()
    assert 1e-6 < lag < 1e-2
'''

README = '''# {pkg}

An algorithm, `{algo}`, and a convergence-rate claim about it, checked by
[ratebench](https://github.com/) as a plug-in (the entry points in pyproject.toml).

```bash
pip install -e .                   # registers {algo} and this repository's claims with ratebench
ratebench check {algo}_bandit      # runs the claim's experiment (or reuses it) and prints its verdict
```

`pytest` runs the test; `.github/workflows/ratebench.yml` runs the experiment, the check and the report in CI.
Edit `{pkg}/algorithm.py` (the step), `{pkg}/conf/experiment/` (what is run) and `{pkg}/conf/claims/` (what
is claimed); a changed algorithm re-runs, never reuses old results.
'''

WORKFLOW = '''# Runs the claim's experiment, checks the claim and uploads the report. The runs folder is cached, keyed by
# the config and code (this repository's sources and conf): an unchanged commit re-uses its runs, a changed
# algorithm or experiment re-runs (ratebench's run hash covers the code too, so a stale cache is never used).
name: ratebench
on: [push, pull_request]
env:
  RATEBENCH: ratebench  # the ratebench to install: a version or a git URL (pip requirement syntax)
  CI: "true"
jobs:
  check:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - name: install
        run: pip install "$RATEBENCH[dist]" -e ".[dev]"
      - name: test
        run: pytest -q
      - uses: actions/cache@v4
        with:
          path: ratebench-runs
          key: ratebench-runs-${{{{ hashFiles('pyproject.toml', '{pkg}/**/*.py', '{pkg}/conf/**/*.yaml') }}}}
      - name: run the claim's experiment
        run: ratebench run -m experiment={algo}_bandit hydra.sweep.dir=ratebench-runs/{algo}_bandit
      - name: check the claim
        run: ratebench check {algo}_bandit --runs ratebench-runs/{algo}_bandit --junit ratebench-junit.xml
      - name: report
        if: always()
        run: ratebench report ratebench-runs/{algo}_bandit --claims {algo}_bandit --out ratebench-report
      - uses: actions/upload-artifact@v4
        if: always()
        with:
          name: ratebench-report
          path: |
            ratebench-report
            ratebench-junit.xml
'''


def package_name(text: str) -> str:
    """A Python package name from a folder name: lower case, non-identifier characters as '_'."""
    name = re.sub(r"\W", "_", text.strip().lower()).strip("_") or "myalgo"
    return f"p_{name}" if name[0].isdigit() else name


def files(pkg: str) -> dict[str, str]:
    """path (relative to the new repository) -> text."""
    algo = f"{pkg}_pg"
    values = {"pkg": pkg, "algo": algo}
    return {
        "pyproject.toml": PYPROJECT.format(**values),
        f"{pkg}/__init__.py": f'"""{pkg}: the {algo} algorithm as a ratebench plug-in."""\n',
        f"{pkg}/algorithm.py": ALGORITHM.format(**values),
        f"{pkg}/conf/__init__.py": "",
        f"{pkg}/conf/algorithm/{algo}.yaml": ALGORITHM_PRESET.format(**values),
        f"{pkg}/conf/experiment/{algo}_bandit.yaml": EXPERIMENT.format(**values),
        f"{pkg}/conf/claims/{algo}_bandit.yaml": CLAIM.format(**values),
        f"tests/test_{pkg}.py": TEST.format(**values),
        "README.md": README.format(**values),
        ".github/workflows/ratebench.yml": WORKFLOW.format(**values),
        ".gitignore": "ratebench-runs/\nratebench-report/\nratebench-junit.xml\n*.egg-info/\n__pycache__/\n",
    }


def scaffold(folder: Path, pkg: str | None = None) -> list[Path]:
    """Write the repository into folder (absent or empty); returns the files written."""
    folder = Path(folder)
    pkg = pkg or package_name(folder.absolute().name)
    written = []
    for rel, text in files(pkg).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(args: list[str]) -> int:
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0 if args else 2
    rest, pkg = list(args), None
    if "--name" in rest:
        i = rest.index("--name")
        if i + 1 >= len(rest):
            print("ratebench init: error: --name needs a package name", file=sys.stderr)
            return 2
        pkg = rest[i + 1]
        del rest[i:i + 2]
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", pkg):
            print(f"ratebench init: error: --name: {pkg!r} is not a Python package name (lower case letters, "
                  f"digits, _)", file=sys.stderr)
            return 2
    if len(rest) != 1 or rest[0].startswith("-"):
        print(f"ratebench init: error: expected one folder, got {rest}\n{USAGE}", file=sys.stderr)
        return 2
    folder = Path(rest[0])
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        print(f"ratebench init: error: {str(folder)!r} exists and is not an empty folder; choose a new one",
              file=sys.stderr)
        return 2
    from ratebench.core.records import unwritable_reason

    why = unwritable_reason(folder)
    if why:
        print(f"ratebench init: error: cannot write {str(folder)!r}: {why}", file=sys.stderr)
        return 2
    for path in scaffold(folder, pkg):
        print(path)
    name = pkg or package_name(folder.absolute().name)
    print(f"\nnext: cd {folder} && pip install -e . && ratebench check {name}_pg_bandit", file=sys.stderr)
    return 0
