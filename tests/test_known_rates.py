"""Known-rate controls (Moulines & Bach 2011): reward_mle with step c/(t+t0)^a has reward_err ~ t^-a, so
`equals 1/a` claims must PASS for a = 3/4, 2/3 and a deliberately wrong claim on the same runs must be
VIOLATED (the a = 1 control and its wrong twins are in test_claims.py). CI-sized runs: 48 seeds (seeds
are batched, nearly free) x 3000 steps instead of the shipped 16 x 12,500. Also: lr_exponent = 1 is
today's control bit for bit, and the stability offset follows (c lambda_max)^(1/a)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ratebench import envs
from ratebench.algorithms.models import ModelConfig, sgd_step
from ratebench.algorithms.reward_mle import RewardMLE, RewardMLEConfig
from ratebench.analysis import commands
from ratebench.analysis.claims import PASS, VIOLATED
from ratebench.envs import bandit
from ratebench.envs.exact import bradley_terry_nll
from ratebench.core.errors import ConfigError
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numerical trouble is a status, never a warning

CLAIMS = Path(commands.__file__).resolve().parent.parent / "conf" / "claims"
CI_SIZED = ["n_seeds=48", "budget.samples=192000"]  # 16 pairs = 32 samples per step: 6000 steps
# The CI-sized runs reach reward_err ~ 0.018 (75 % of 48 seeds for a = 2/3), not the shipped claims'
# eps_min, and above ~0.25 they are still in SGD's transient (local exponent falling towards 1/a; with
# eps_max = 1 the a = 3/4 CI is [1.41, 1.69], above 4/3). A PASS needs the window to reach eps_min
# (issue 10), so the tests judge the same claims on [0.017, 0.25], the asymptotic range these runs
# cover. The shipped claims are judged on the full 16-seed experiments (docs/analysis.md).
CI_EPSILON = {"unit": "reward_err", "min": 0.017, "max": 0.25}


def fisher_spectrum_numpy(problem) -> tuple[float, float]:
    """Smallest non-zero and largest eigenvalue of the BT Fisher of the linear bandit reward at the truth,
    E_x E_{a,a' ~ pi_ref} sigma'(r*_a - r*_a') (phi_a - phi_a')(phi_a - phi_a')^T, written out in numpy."""
    phi = problem.unit_features.numpy()  # (X * A, d), unit (x, a) = x * A + a
    X, A = problem.steps[0].ref_logp.shape
    phi, true = phi.reshape(X, A, -1), problem.true_unit_reward.numpy().reshape(X, A)
    q = np.exp(problem.steps[0].ref_logp.numpy())
    fisher = np.zeros((phi.shape[2], phi.shape[2]))
    for x in range(X):
        for a in range(A):
            for b in range(A):
                s = 1 / (1 + np.exp(-(true[x, a] - true[x, b])))
                dphi = phi[x, a] - phi[x, b]
                fisher += q[x, a] * q[x, b] * s * (1 - s) * np.outer(dphi, dphi) / X
    eig = np.linalg.eigvalsh(fisher)
    return float(eig[eig > 1e-9 * eig.max()].min()), float(eig.max())


def small_bandit():
    return envs.make(bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3))


def test_fisher_spectrum_matches_numpy():
    problem = small_bandit()
    algo = RewardMLE(RewardMLEConfig(), ModelConfig(), problem)
    mu, lam_max = fisher_spectrum_numpy(problem)
    assert algo.c == pytest.approx(2.0 / mu, rel=1e-10)
    assert algo.t0 == pytest.approx(max(10.0, algo.c * lam_max), rel=1e-10)


@pytest.mark.parametrize("t0", [10.0, 0.0])  # 0: the offset is c lambda_max (the stability branch)
def test_lr_exponent_1_is_todays_control_bit_for_bit(t0):
    """The default reproduces the pre-lr_exponent update exactly: step c / (t + max(t0, c lambda_max))."""
    problem = small_bandit()
    algo = RewardMLE(RewardMLEConfig(t0=t0), ModelConfig(), problem)
    algo.impl = "reference"  # bit for bit is the reference path's promise (impl=fast: tests/test_fast.py)
    assert algo.cfg.lr_exponent == 1.0
    lam_max = fisher_spectrum_numpy(problem)[1]
    offset = max(t0, algo.c * lam_max)
    assert algo.t0 == pytest.approx(offset, rel=1e-10)
    seeds = [0, 1]
    state, sampler = algo.init(seeds), CountingSampler(problem, seeds, Counters())
    nu, ref_sampler = [p.clone() for p in state.nu], CountingSampler(problem, seeds, Counters())
    for t in range(6):
        state = algo.step(state, sampler)
        pairs = ref_sampler.pairs(problem.ref_log_probs(), algo.cfg.batch_pairs)

        def loss(params):
            r = algo.model.step_tables(params)
            return bradley_terry_nll(pairs.first.returns(r) - pairs.second.returns(r), pairs.label).mean(1)

        lr = algo.c / (t + algo.t0)  # today's formula, no power
        nu = sgd_step(nu, loss, lr)
        assert state.lr == lr and torch.equal(state.nu[0], nu[0])


@pytest.mark.parametrize("a", [0.75, 2 / 3])
def test_offset_keeps_the_first_step_stable(a):
    problem = small_bandit()
    algo = RewardMLE(RewardMLEConfig(t0=0.0, lr_exponent=a), ModelConfig(), problem)
    lam_max = fisher_spectrum_numpy(problem)[1]
    assert algo.t0 == pytest.approx((algo.c * lam_max) ** (1 / a), rel=1e-10)
    state = algo.step(algo.init([0]), CountingSampler(problem, [0], Counters()))
    assert state.lr == pytest.approx(algo.c / algo.t0**a) and state.lr * lam_max == pytest.approx(1.0)
    state = algo.step(state, CountingSampler(problem, [0], Counters()))
    assert state.lr == pytest.approx(algo.c / (1 + algo.t0) ** a)


@pytest.mark.parametrize("value", [0.5, 0.4, 1.01, 0.0])
def test_lr_exponent_outside_the_robbins_monro_range_is_refused(value):
    with pytest.raises(ConfigError) as info:
        RewardMLEConfig(lr_exponent=value).check()
    assert info.value.field == "algorithm.lr_exponent" and "(1/2, 1]" in str(info.value)


def test_bad_lr_exponent_exits_2_before_any_run(expect_bad_input):
    expect_bad_input(["algorithm=reward_mle", "algorithm.lr_exponent=0.5"], ["algorithm.lr_exponent", "(1/2, 1]"])


def run_ci_sized(tmp_path_factory, experiment: str) -> Path:
    from ratebench.config import compose

    out = tmp_path_factory.mktemp(experiment)
    run_job(compose([f"experiment={experiment}", *CI_SIZED, "progress=false"]), out / "run", experiment=experiment)
    return out


def check(claim: Path, runs: Path) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # the CI-sized runs are the experiment at a smaller budget: freed for this check, as a user would
        code = commands.main("check", [str(claim), "--runs", str(runs), "--json", "--free", "budget.samples"])
    (row,) = json.loads(out.getvalue())
    return code, row


def twin(tmp_path: Path, source: str, **change) -> Path:
    """A claim file built from a shipped one with some fields changed."""
    data = yaml.safe_load((CLAIMS / source).read_text())
    data.update(change)
    path = tmp_path / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def runs_a075(tmp_path_factory):
    return run_ci_sized(tmp_path_factory, "control_bandit_a075")


@pytest.fixture(scope="module")
def runs_a067(tmp_path_factory):
    return run_ci_sized(tmp_path_factory, "control_bandit_a067")


def test_a075_control_passes_and_the_1_over_t_claim_is_violated(runs_a075, tmp_path):
    code, row = check(twin(tmp_path, "control_a075.yaml", epsilon=CI_EPSILON), runs_a075)
    assert code == 0 and row["verdict"] == PASS and row["p_low"] <= 4 / 3 <= row["p_high"], row
    assert row["n_seeds"] == 48
    # wrong twin: "this SGD is as fast as 1/t" (n_hit <= C eps^-1), what a fitter biased towards 1 would say
    wrong = twin(tmp_path, "control_a075.yaml", id="control_a075_wrong", relation="upper_bound", exponent=1.0,
                epsilon=CI_EPSILON)
    code, row = check(wrong, runs_a075)
    assert code == 1 and row["verdict"] == VIOLATED and row["p_low"] > 1.0, row


def test_a067_control_passes_and_the_a1_claim_is_violated(runs_a067, tmp_path):
    code, row = check(twin(tmp_path, "control_a067.yaml", epsilon=CI_EPSILON), runs_a067)
    assert code == 0 and row["verdict"] == PASS and row["p_low"] <= 1.5 <= row["p_high"], row
    # wrong twin: the a = 1 control's claim (1 +- 0.2) on the a = 2/3 runs
    wrong = twin(tmp_path, "control.yaml", id="control_a067_wrong", experiment="control_bandit_a067", epsilon=CI_EPSILON)
    code, row = check(wrong, runs_a067)
    assert code == 1 and row["verdict"] == VIOLATED and row["p_low"] > 1.2, row
