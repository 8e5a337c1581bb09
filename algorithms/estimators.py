"""Stochastic gradient estimators shared by every algorithm: the one home of each.

Each returns a per-seed *surrogate* (B,) whose autograd gradient is the estimate, so that
one backward pass over the seed-summed surrogate gives every seed its own estimate. Samples
come from the CountingSampler only (the caller draws them), so every one is counted.
The fast path (impl=fast) uses the `*_weights` beside each surrogate: the surrogate's gradient in
closed form, as one weight per trajectory on its log pi(tau) or R(tau) (tests/test_fast.py ties them).
"""
from __future__ import annotations

import torch

from ratebench.envs.exact import bradley_terry_nll, bradley_terry_nll_grad
from ratebench.envs.sampling import PreferencePairs, Trajectories


def leave_one_out_baseline(values: torch.Tensor) -> torch.Tensor:
    """b_i = mean_{j != i} v_j within each seed's batch: (B, N) -> (B, N).

    Independent of sample i, so subtracting it keeps a score-function estimator unbiased
    without drawing extra samples. Needs N >= 2.
    """
    n = values.shape[1]
    if n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per seed")
    return (values.sum(1, keepdim=True) - values) / (n - 1)


def kl_regularised_return(traj: Trajectories, rewards: list[torch.Tensor], logps: list[torch.Tensor],
                          ref_logps: list[torch.Tensor], beta: float) -> torch.Tensor:
    """G(tau) = R(tau) - beta sum_t log pi/pi_ref (a_t|s_t): (B, N)."""
    return traj.returns(rewards) - beta * (traj.log_prob(logps) - traj.log_prob(ref_logps))


def importance_weights(traj: Trajectories, target_logps: list[torch.Tensor],
                       behaviour_logps: list[torch.Tensor]) -> torch.Tensor:
    """w(tau) = pi_target(tau) / pi_behaviour(tau) of trajectories drawn from the behaviour policy, detached:
    E_behaviour[w(tau) h(tau)] = E_target[h(tau)], so an estimator at another policy can reuse the same samples
    (the momentum step's estimate at the previous iterate). (B, N)"""
    with torch.no_grad():
        return torch.exp(traj.log_prob(target_logps) - traj.log_prob(behaviour_logps))


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-seed mean over the batch, each sample times its importance weight when given: (B, N) -> (B,)."""
    return (values if weights is None else weights * values).mean(1)


def policy_gradient_surrogate(traj: Trajectories, rewards: list[torch.Tensor], logps: list[torch.Tensor],
                              ref_logps: list[torch.Tensor], beta: float,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE for J(nu, theta) = E[R_nu] - beta KL, leave-one-out baseline.

    grad_theta J = E[(G(tau) - b) grad log pi_theta(tau)]; G's own theta-dependence adds
    -beta E[grad log pi] = 0. `logps` must carry the graph to theta; rewards are detached. `weights`
    (importance_weights, when the trajectories come from another policy): each term times w(tau); b_i does
    not depend on tau_i, so the estimate stays unbiased. (B,)
    """
    with torch.no_grad():
        ret = kl_regularised_return(traj, [r.detach() for r in rewards], [lp.detach() for lp in logps],
                                    ref_logps, beta)
        advantage = ret - leave_one_out_baseline(ret)
    return _weighted_mean(advantage * traj.log_prob(logps), weights)


def policy_gradient_weights(ret: torch.Tensor) -> torch.Tensor:
    """policy_gradient_surrogate's gradient in closed form: the weight (G(tau_i) - b_i) / N on each
    log pi(tau_i), from G = kl_regularised_return (B, N). (B, N)"""
    return (ret - leave_one_out_baseline(ret)) / ret.shape[1]


def reward_return_surrogate(traj: Trajectories, rewards: list[torch.Tensor],
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """grad_nu of E_{tau ~ pi}[R_nu(tau)] = -grad_nu g: mean R_nu over the trajectories (importance-weighted
    when `weights` is given). (B,)"""
    return _weighted_mean(traj.returns(rewards), weights)


def pair_weights(pairs: PreferencePairs, target_logps: list[torch.Tensor],
                 behaviour_logps: list[torch.Tensor]) -> torch.Tensor:
    """importance_weights of a pair, both members drawn from the behaviour policy: w(tau) w(tau'). (B, M)"""
    return (importance_weights(pairs.first, target_logps, behaviour_logps)
            * importance_weights(pairs.second, target_logps, behaviour_logps))


def preference_loss(pairs: PreferencePairs, rewards: list[torch.Tensor],
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """BT negative log-likelihood of the labelled pairs, mean per seed (importance-weighted when `weights` is
    given); its nu-gradient is the estimate of grad_nu f. (B,)"""
    margin = pairs.first.returns(rewards) - pairs.second.returns(rewards)
    return _weighted_mean(bradley_terry_nll(margin, pairs.label), weights)


def preference_loss_weights(margin: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """preference_loss's gradient in closed form: the weight on R(tau) of each pair (and minus it on
    R(tau')), d/d margin of the mean BT loss, margin = R(tau) - R(tau') (B, M). (B, M)"""
    return bradley_terry_nll_grad(margin, label) / margin.shape[1]


def preference_score_surrogate(pairs: PreferencePairs, rewards: list[torch.Tensor],
                               logps: list[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """Score-function estimate of grad_theta f(nu, theta) when both members come from pi_theta:
    E[(l - b)(grad log pi(tau) + grad log pi(tau'))], l the pair's BT loss, leave-one-out b
    (importance-weighted by pair_weights when `weights` is given). (B,)"""
    with torch.no_grad():
        margin = pairs.first.returns(rewards) - pairs.second.returns(rewards)
        loss = bradley_terry_nll(margin, pairs.label)
        centred = loss - leave_one_out_baseline(loss)
    return _weighted_mean(centred * (pairs.first.log_prob(logps) + pairs.second.log_prob(logps)), weights)


def preference_score_weights(margin: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """preference_score_surrogate's gradient in closed form: the weight (l - b) / M on both
    log pi(tau) and log pi(tau') of each pair, margin = R_nu(tau) - R_nu(tau') (B, M). (B, M)"""
    loss = bradley_terry_nll(margin, label)
    return (loss - leave_one_out_baseline(loss)) / loss.shape[1]
