"""Plug-ins by entry points (core/registry.py), code identity in the run hash, claims by path, deduplication
that keeps the experiment-tagged copy, check --junit, and `ratebench init` end to end under the joblib launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from ratebench.core import registry
from ratebench.analysis.junit import junit_xml
from ratebench.analysis.load import Loaded, deduplicate
from ratebench.code_identity import source_hash
from ratebench.scaffold import scaffold

CLI = [sys.executable, "-c", "import sys; from ratebench.cli import main; sys.exit(main())"]


def fake_distribution(site: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """A distribution as pip leaves it on a path entry: modules plus <name>-0.1.dist-info with entry_points.txt."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for rel, text in modules.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(textwrap.dedent(text))


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_builtins_are_found_through_ratebench_own_entry_points():
    from ratebench.algorithms import ALGORITHMS
    from ratebench.envs import ENVIRONMENTS

    assert {p.name for p in registry.plugins("algorithms") if p.builtin} == set(ALGORITHMS) == {
        "bilevel", "dpo", "npg", "offline_rlhf", "ppo_rlhf", "reward_mle", "softmax_pg"}
    assert set(ENVIRONMENTS) == {"bandit", "mdp", "token"}
    assert all(ALGORITHMS.plugin(n).distribution == "ratebench" for n in ALGORITHMS)


def test_a_plugin_that_fails_to_import_stops_with_its_name(site):
    from ratebench.algorithms import _refusal

    fake_distribution(site, "broken", """
        [ratebench.algorithms]
        typo = broken_algo:Typo
    """, {"broken_algo.py": "import no_such_module_here\n"})
    fresh = registry.Registry("algorithms", _refusal)
    with pytest.raises(registry.PluginError, match=r"typo.*broken.*ModuleNotFoundError.*no_such_module_here"):
        list(fresh)
    run = _run(["run", "--cfg", "job"], _env(PYTHONPATH=str(site)), site)  # the CLI: bad input, one line, exit 2
    assert run.returncode == 2 and "typo = 'broken_algo:Typo' of broken failed to load" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_an_entry_point_whose_name_differs_from_the_class_is_refused(site):
    from ratebench.algorithms import _refusal

    fake_distribution(site, "misnamed", """
        [ratebench.algorithms]
        other = misnamed_algo:SoftmaxPG
    """, {"misnamed_algo.py": "from ratebench.algorithms.softmax_pg import SoftmaxPG\n"})
    with pytest.raises(registry.PluginError, match="not the entry point's name 'other'"):
        list(registry.Registry("algorithms", _refusal))


def test_one_name_declared_by_two_distributions_is_refused(site):
    fake_distribution(site, "clash", """
        [ratebench.envs]
        bandit = clash_env:SPEC
    """, {"clash_env.py": "SPEC = None\n"})
    with pytest.raises(registry.PluginError, match="declared twice"):
        registry.plugins("envs")


WIDE_ENV = """
from dataclasses import dataclass

from ratebench.envs import bandit
from ratebench.envs.spec import EnvSpec


@dataclass
class WideConfig(bandit.BanditConfig):
    name: str = "wide"
    n_contexts: int = 3
    n_actions: int = 3


SPEC = EnvSpec(WideConfig, bandit.check, bandit.build, bandit.sizes)
"""


def test_an_environment_plugin_without_a_preset_runs_and_its_sizes_bound_memory(tmp_path, site):
    """An env declared only by its entry point (no env/wide.yaml anywhere) is selectable as env=wide, validated by
    its own check and sized by its own sizes() (the memory estimate refuses it by name of its knob)."""
    fake_distribution(site, "widepkg", """
        [ratebench.envs]
        wide = wide_env:SPEC
    """, {"wide_env.py": WIDE_ENV})
    env = _env(PYTHONPATH=str(site))
    run = _run(["run", "env=wide", "n_seeds=2", "budget.samples=200", f"hydra.run.dir={tmp_path / 'wide'}"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "wide" / "run.json").read_text())
    assert (record["env"], record["config"]["env"]["n_actions"]) == ("wide", 3)
    [plugin] = record["provenance"]["code"]["plugins"]
    assert (plugin["kind"], plugin["name"], plugin["distribution"]) == ("envs", "wide", "widepkg")
    bad = _run(["run", "env=wide", "env.n_actions=1", f"hydra.run.dir={tmp_path / 'bad'}"], env, tmp_path)
    assert bad.returncode == 2 and "env.n_actions: must be >= 2" in bad.stderr and not (tmp_path / "bad").exists()
    huge = _run(["run", "env=wide", "n_seeds=4096", "env.n_contexts=4096", "env.max_pairs=1000000000",
                 f"hydra.run.dir={tmp_path / 'huge'}"], dict(env, RATEBENCH_MEMORY_LIMIT="1G"), tmp_path)
    assert huge.returncode == 2 and "estimated peak memory" in huge.stderr, huge.stderr


def test_source_hash_follows_every_source_file_of_the_package(site):
    (site / "hashed" / "sub").mkdir(parents=True)
    (site / "hashed" / "__init__.py").write_text("")
    (site / "hashed" / "sub" / "step.py").write_text("LR = 1.0\n")
    before = source_hash("hashed.sub.step")
    assert source_hash("hashed") == before  # the top-level package, whichever module names it
    (site / "hashed" / "sub" / "step.py").write_text("LR = 0.01\n")
    assert source_hash("hashed.sub.step") != before


def test_deduplication_keeps_the_copy_tagged_with_the_experiment():
    seeds = pd.DataFrame({"run_hash": ["h", "h", "h", "h"], "seed": [0, 1, 0, 1],
                          "run_dir": ["a/untagged", "a/untagged", "b/tagged", "b/tagged"],
                          "experiment": [None, None, "exp", "exp"]})
    metrics = seeds.assign(samples=10)
    with pytest.warns(UserWarning, match="duplicate runs"):
        kept = deduplicate(Loaded(metrics, seeds, []))
    assert list(kept.seeds["run_dir"]) == ["b/tagged", "b/tagged"]
    assert list(kept.metrics["run_dir"]) == ["b/tagged", "b/tagged"]


def test_junit_has_one_testcase_per_claim_with_its_outcome():
    rows = [{"claim": c, "algorithm": "a", "verdict": v, "reason": f"because {c}", "note": ""}
            for c, v in (("ok", "PASS"), ("bad", "VIOLATED"), ("open", "INCONCLUSIVE"))]
    suite = ET.fromstring(junit_xml(rows).split("?>", 1)[1]).find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert cases["ok"].find("failure") is None and cases["ok"].find("skipped") is None
    assert cases["bad"].find("failure").get("message") == "VIOLATED: because bad"
    assert cases["open"].find("skipped").get("message") == "INCONCLUSIVE: because open"


def _run(args, env, cwd, timeout=600):
    return subprocess.run(CLI + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CI="true", **extra)


CLAIM_BY_PATH = """
id: pg_by_path
source: "a claim kept outside the package"
algorithm: softmax_pg
env: bandit
experiment: pg_by_path
metric: policy_gap
x: step
exponent: 1.0
relation: upper_bound
epsilon: {unit: policy_gap, min: 1.0e-4, max: 1.0e-2}
min_seeds: 2
instances: 1
"""
EXPERIMENT_BY_PATH = """# @package _global_
defaults:
  - override /env: bandit
  - override /algorithm: softmax_pg
algorithm: {oracle: exact, init_scale: 0.3}
budget: {steps: 300, evals_per_decade: 10}
n_seeds: 2
env: {instance_seed: 1}
tuning_instances: [0]
"""


def test_a_claim_file_given_by_path_runs_its_experiment_and_gets_a_verdict(tmp_path):
    conf = tmp_path / "myrepo" / "conf"
    (conf / "claims").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "claims" / "pg_by_path.yaml").write_text(CLAIM_BY_PATH)
    (conf / "experiment" / "pg_by_path.yaml").write_text(EXPERIMENT_BY_PATH)
    out = _run(["check", str(conf / "claims" / "pg_by_path.yaml"), "--workdir", str(tmp_path / "work"), "--json"],
               _env(), tmp_path)
    assert out.returncode in (0, 1), out.stderr
    [row] = json.loads(out.stdout)
    assert row["claim"] == "pg_by_path" and row["verdict"] in ("PASS", "VIOLATED", "INCONCLUSIVE")
    assert row["n_seeds"] == 2, row["reason"]  # the experiment's own runs were found as its evidence
    runs = list((tmp_path / "work" / "pg_by_path").rglob("run.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["experiment"] == "pg_by_path"


def _install(repo: Path, target: Path) -> None:
    """pip install --no-deps --target: the plug-in lands in its own folder, put on PYTHONPATH by the runs
    (the launcher workers inherit it); the test's environment is not changed."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target),
                    str(repo)], check=True, capture_output=True, timeout=600)


def test_a_changed_plugin_source_reruns_instead_of_skipping(tmp_path):
    repo, site = tmp_path / "changing", tmp_path / "site"
    scaffold(repo)
    _install(repo, site)
    env = _env(PYTHONPATH=str(site))
    args = ["run", "algorithm=changing_pg", "budget.steps=20", "n_seeds=2", f"hydra.run.dir={tmp_path / 'run'}"]
    first, again = _run(args, env, tmp_path), _run(args, env, tmp_path)
    assert first.returncode == 0 and "wrote" in first.stdout, first.stderr
    assert "skipping" in again.stdout  # unchanged code: the finished run is reused
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    [plugin] = record["provenance"]["code"]["plugins"]
    assert (plugin["name"], plugin["distribution"], plugin["version"]) == ("changing_pg", "changing", "0.1.0")
    algorithm = repo / "changing" / "algorithm.py"
    source = algorithm.read_text()
    assert "value, -self.cfg.lr)" in source
    algorithm.write_text(source.replace("value, -self.cfg.lr)", "value, -self.cfg.lr / 100)"))  # same config
    _install(repo, site)
    changed = _run(args, env, tmp_path)
    assert changed.returncode == 0 and "skipping" not in changed.stdout and "wrote" in changed.stdout, changed.stderr
    after = json.loads((tmp_path / "run" / "run.json").read_text())
    assert after["config_hash"] == record["config_hash"] and after["run_hash"] != record["run_hash"]
    assert after["provenance"]["code"]["plugins"][0]["source_hash"] != plugin["source_hash"]


@pytest.mark.slow
def test_init_scaffold_installs_sweeps_under_joblib_and_passes_its_check(tmp_path):
    repo, site = tmp_path / "newalgo", tmp_path / "site"
    scaffold(repo)
    _install(repo, site)
    env = _env(PYTHONPATH=str(site))
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests"],
                           env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-2000:]
    sweep = tmp_path / "runs"
    run = _run(["run", "-m", "experiment=newalgo_pg_bandit", "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}"],
               env, repo)
    assert run.returncode == 0 and "sweep of 2 jobs: 2 done" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    junit = tmp_path / "junit.xml"
    check = _run(["check", "newalgo_pg_bandit", "--runs", str(sweep), "--junit", str(junit), "--no-premise"], env, repo)
    assert check.returncode == 0, check.stdout + check.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    [case] = suite.findall("testcase")
    assert case.get("name") == "newalgo_pg_bandit" and case.find("failure") is None and case.find("skipped") is None
    assert "algorithm newalgo_pg from newalgo 0.1.0" in case.find("system-out").text
