"""The bilevel noise switches algorithm.oracle=exact_lower | exact_upper: each of the four estimates is,
component by component, the exact oracle's (lower level: value_theta, value_nu; upper level: upper_theta,
upper_nu) or the stochastic oracle's on the same sampler state, exactly; the sample counter counts only
the stochastic draws; the switches take the reference step and never batch instances."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from ratebench import envs
from ratebench.algorithms.bilevel import Bilevel, BilevelConfig
from ratebench.algorithms.models import ModelConfig, NetConfig
from ratebench.algorithms.oracles import ExactOracle, StochasticOracle, make_oracle
from ratebench.algorithms.softmax_pg import SoftmaxPGConfig
from ratebench.core.errors import ConfigError
from ratebench.envs import bandit, mdp
from ratebench.envs.sampling import Counters, CountingSampler
from ratebench.runner import run_job

SMALL = {
    "bandit": bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3),
    "mdp": mdp.MDPConfig(n_states=3, n_actions=2, horizon=3),
}
SEEDS = [0, 1]
# which pure oracle each estimate of a switch must equal (F2SA's levels: g = -J lower, f upper)
PARTS = {
    "exact_lower": {"value_theta": "exact", "value_nu": "exact", "upper_theta": "stochastic", "upper_nu": "stochastic"},
    "exact_upper": {"value_theta": "stochastic", "value_nu": "stochastic", "upper_theta": "exact", "upper_nu": "exact"},
}


def make(name: str, **cfg) -> Bilevel:
    model = ModelConfig(reward=NetConfig(width=4, activation="tanh"), policy=NetConfig(width=4))
    return Bilevel(BilevelConfig(**cfg), model, envs.make(SMALL[name]))


def point(algo: Bilevel):
    """(nu, theta) for two seeds, theta moved off pi_ref so that no gradient vanishes by symmetry."""
    nu, theta = algo.reward.init(SEEDS), algo.policy.init(SEEDS)
    gen = torch.Generator().manual_seed(5)
    theta[-2] = 0.7 * torch.randn(theta[-2].shape, generator=gen, dtype=torch.float64)
    return [p.requires_grad_(True) for p in nu], [p.requires_grad_(True) for p in theta]


def gradient(algo, oracle, method, nu, theta, sampler, n=3):
    """The estimate `method` of `oracle` as a flat gradient (the one it gives to the step), per seed."""
    if method in ("value_theta", "upper_theta"):
        rewards = [r.detach() for r in algo.reward.step_tables(nu)]
        surrogate = getattr(oracle, method)(sampler, rewards, algo.policy.log_probs(theta), n)
        grads = torch.autograd.grad(surrogate.sum(), theta)
    else:
        logps = [lp.detach() for lp in algo.policy.log_probs(theta)]
        grads = torch.autograd.grad(getattr(oracle, method)(sampler, logps, n)(algo.reward.step_tables(nu)).sum(), nu)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1)


@pytest.mark.parametrize("env", sorted(SMALL))
@pytest.mark.parametrize("switch", sorted(PARTS))
def test_each_estimate_of_a_switch_is_the_pure_oracles_on_the_same_sampler_state(env, switch):
    algo = make(env, oracle=switch)
    nu, theta = point(algo)
    pure = {"exact": ExactOracle(algo.problem), "stochastic": StochasticOracle(algo.problem)}
    mixed = make_oracle(switch, algo.problem)
    for method, source in PARTS[switch].items():
        mixed_sampler = CountingSampler(algo.problem, SEEDS, mixed_counts := Counters())
        pure_sampler = CountingSampler(algo.problem, SEEDS, pure_counts := Counters())
        untouched = CountingSampler(algo.problem, SEEDS, Counters()).state_dict()
        got = gradient(algo, mixed, method, nu, theta, mixed_sampler)
        want = gradient(algo, pure[source], method, nu, theta, pure_sampler)
        assert torch.equal(got, want), (method, source)
        assert got.abs().max() > 0, method  # a vanishing gradient would make the comparison empty
        assert mixed_sampler.state_dict() == pure_sampler.state_dict(), method
        assert (mixed_counts.samples, mixed_counts.queries) == (pure_counts.samples, pure_counts.queries), method
        if source == "exact":  # an exact part draws nothing: the sampler is where it started
            assert mixed_counts.samples == 0 and mixed_sampler.state_dict() == untouched, method
        else:
            assert mixed_counts.samples > 0, method
    # and the other pure oracle differs on every part (so the comparison above can tell them apart)
    for method, source in PARTS[switch].items():
        other = pure["stochastic" if source == "exact" else "exact"]
        sampler = CountingSampler(algo.problem, SEEDS, Counters())
        assert not torch.allclose(gradient(algo, other, method, nu, theta, sampler),
                                  gradient(algo, mixed, method, nu, theta, CountingSampler(algo.problem, SEEDS, Counters())))


def per_step_draws(switch: str, n_traj: int, n_pairs: int, inner: int) -> tuple[int, int]:
    """(samples, queries) per seed and outer step, from the draws of docs/bilevel.md: per z/y stage N
    trajectories for g^_theta J(z), M pairs for g^_theta f(y) and N for g^_theta J(y); the nu stage M pairs for
    g^_nu f(y) and N each for g^_nu J(z), g^_nu J(y). A pair is two samples and one query."""
    lower = (inner * 2 + 2) * n_traj  # every value_* draw
    upper = (inner + 1) * n_pairs  # every upper_* draw, in pairs
    if switch == "exact_lower":
        return 2 * upper, upper
    if switch == "exact_upper":
        return lower, 0
    return lower + 2 * upper, upper  # stochastic


@pytest.mark.parametrize("env", sorted(SMALL))
@pytest.mark.parametrize("switch", ["exact_lower", "exact_upper", "stochastic"])
def test_a_step_counts_only_the_stochastic_draws(env, switch):
    n_traj, n_pairs, inner = 3, 2, 2
    algo = make(env, oracle=switch, batch_traj=n_traj, batch_pairs=n_pairs, inner_steps=inner)
    algo.impl = "reference"
    counters = Counters()
    sampler = CountingSampler(algo.problem, SEEDS, counters)
    state = algo.init(SEEDS)
    before = {k: [p.clone() for p in getattr(state, k)] for k in ("nu", "y", "z")}
    for _ in range(3):
        state = algo.step(state, sampler)
    samples, queries = per_step_draws(switch, n_traj, n_pairs, inner)
    assert (counters.samples, counters.queries) == (3 * samples, 3 * queries)
    for key, old in before.items():  # every sequence moves
        assert any(not torch.equal(a, b) for a, b in zip(getattr(state, key), old)), key


@pytest.mark.parametrize("switch", ["exact", "exact_lower", "exact_upper"])
def test_a_switch_takes_the_reference_step_and_never_batches_instances(switch):
    algo = make("bandit", oracle=switch)
    for impl in ("fast", "eager", "reference"):
        algo.impl = impl
        assert algo.step_path() == "reference"
        assert algo.segment_samples(algo.init(SEEDS)) is None  # no compiled segments either
    why = Bilevel.instance_batch_refusal(algo.cfg)
    assert why and f"algorithm.oracle={switch}" in why
    assert Bilevel.instance_batch_refusal(BilevelConfig()) is None


def test_the_oracle_error_lists_every_value_and_softmax_pg_keeps_its_two():
    with pytest.raises(ConfigError) as info:
        BilevelConfig(oracle="exact_middle").check()
    message = str(info.value)
    assert "algorithm.oracle" in message
    assert all(v in message for v in ("stochastic", "exact", "exact_lower", "exact_upper"))
    for switch in ("exact_lower", "exact_upper"):
        BilevelConfig(oracle=switch).check()
        with pytest.raises(ConfigError, match="algorithm.oracle"):
            SoftmaxPGConfig(oracle=switch).check()  # the switches are the bilevel method's (two levels)


def test_a_switched_run_counts_its_stochastic_draws_per_step(compose_config, tmp_path):
    cfg = compose_config(["algorithm=bilevel", "algorithm.oracle=exact_lower", "budget.steps=12",
                          "budget.samples=10000000", "seeds=[0,1]", "algorithm.batch_traj=4",
                          "algorithm.batch_pairs=3"])
    record = run_job(cfg, tmp_path)
    samples, queries = per_step_draws("exact_lower", 4, 3, 1)
    assert record["counters"] == {"samples": 12 * samples, "queries": 12 * queries, "step": 12}
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    last = frame[frame.step == 12]
    assert (last.samples == 12 * samples).all() and last.grad_sq.notna().all()
