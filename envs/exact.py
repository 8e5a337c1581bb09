"""Exact, differentiable float64 evaluation on a TabularProblem: the one home of the solvers.

Everything takes reward and policy *tables* (never networks): rewards as per-step tables
[(B, n_h, A)], policies as per-step log-probability tables [(B, n_h, A)].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_

from ratebench.envs.tabular import TabularProblem

Tables = list[torch.Tensor]


def _expected_next(step, values_next: torch.Tensor) -> torch.Tensor:
    """E_{s' ~ P(.|s,a)} V_{h+1}(s') for all (s, a): (B, n_{h+1}) -> (B, n_h, A)."""
    return (values_next[:, step.next_idx] * step.next_prob).sum(-1)


def soft_optimal(problem: TabularProblem, rewards: Tables) -> tuple[Tables, torch.Tensor]:
    """KL-regularised optimal policy by soft backward induction.

    Q_h = r_h + E V_{h+1};  V_h = beta log sum_a pi_ref exp(Q_h / beta);
    pi*_h = pi_ref exp((Q_h - V_h) / beta). Returns (log pi* tables, V_0 of shape (B, G)).
    """
    beta = problem.beta
    values, logps = None, [None] * problem.horizon
    for h in reversed(range(problem.horizon)):
        step = problem.steps[h]
        q = rewards[h]
        if values is not None:
            q = q + _expected_next(step, values)
        scaled = step.ref_logp + q / beta
        norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
        logps[h] = scaled - norm
        values = beta * norm.squeeze(-1)
    return logps, values


def policy_q(problem: TabularProblem, rewards: Tables, logps: Tables,
             beta: float | None = None) -> tuple[Tables, torch.Tensor]:
    """Q_h^pi of the KL-regularised value by backward evaluation: Q_h = r_h + E V_{h+1},
    V_h = sum_a pi_h (Q_h - beta log(pi_h/pi_ref)), beta the problem's unless given (0: the plain return).
    Returns (Q tables [(B, n_h, A)], V_0 of shape (B, G))."""
    beta = problem.beta if beta is None else beta
    values, qs = None, [None] * problem.horizon
    for h in reversed(range(problem.horizon)):
        step = problem.steps[h]
        q = rewards[h]
        if values is not None:
            q = q + _expected_next(step, values)
        qs[h] = q
        regulariser = beta * (logps[h] - step.ref_logp) if beta else 0.0
        values = (logps[h].exp() * (q - regulariser)).sum(-1)
    return qs, values


def policy_value(problem: TabularProblem, rewards: Tables, logps: Tables) -> torch.Tensor:
    """J = E_pi[sum_t r_t - beta log(pi/pi_ref)] by backward evaluation. Returns (B,)."""
    return policy_q(problem, rewards, logps)[1] @ problem.init_prob


def expected_return(problem: TabularProblem, rewards: Tables, logps: Tables) -> torch.Tensor:
    """E_pi[sum_t r_t], the unregularised value (no KL term): policy_q's evaluation with beta = 0. Returns (B,)."""
    return policy_q(problem, rewards, logps, beta=0.0)[1] @ problem.init_prob


def max_return(problem: TabularProblem, rewards: Tables) -> torch.Tensor:
    """max_pi E_pi[sum_t r_t], the unregularised optimum, by (hard) backward induction. Returns (B,)."""
    values = None
    for h in reversed(range(problem.horizon)):
        q = rewards[h] if values is None else rewards[h] + _expected_next(problem.steps[h], values)
        values = q.amax(-1)
    return values @ problem.init_prob


def optimal_value(problem: TabularProblem, rewards: Tables) -> torch.Tensor:
    """J*(r) = max_pi J = sum_g rho(g) V*_0(g). Returns (B,)."""
    return soft_optimal(problem, rewards)[1] @ problem.init_prob


def trajectory_returns(problem: TabularProblem, rewards: Tables) -> torch.Tensor:
    """R(tau) for every enumerated trajectory: (B, G, m)."""
    return problem.trajectory_table().gather(rewards)


def pair_feature_differences(problem: TabularProblem, features: torch.Tensor) -> torch.Tensor:
    """Phi(tau_gi) - Phi(tau_gj) of every enumerated pair of trajectories from one initial state g, Phi(tau) the sum
    of the unit features (n_units, d) along tau: (d, G, m, m), each feature dimension read as a unit reward."""
    phi = trajectory_returns(problem, problem.step_tables_from_units(features.T.contiguous()))  # (d, G, m)
    return phi[:, :, :, None] - phi[:, :, None, :]


def trajectory_probs(problem: TabularProblem, logps: Tables) -> torch.Tensor:
    """P(tau | initial state g) under the policy: (B, G, m)."""
    table = problem.trajectory_table()
    return (table.gather(logps) + table.log_trans).exp()


def bradley_terry_nll(margin: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """BCE(p, sigmoid(margin)) = softplus(margin) - p * margin: the one BT loss of the suite.

    margin = R(tau) - R(tau'); p = P(tau preferred) (a 0/1 label or the oracle's probability).
    """
    return F_.softplus(margin).sub_(p * margin)  # in softplus's result (autograd keeps softplus's input): one
    #                                              table fewer to allocate, the same bits as softplus - p margin


def bradley_terry_nll_grad(margin: torch.Tensor, p: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """d bradley_terry_nll / d margin = sigmoid(margin) - p (the fast path's closed form); overwrite: in margin's
    own memory (no autograd), the same bits without allocating another table."""
    return margin.sigmoid_().sub_(p) if overwrite else torch.sigmoid(margin) - p


def preference_prob(problem: TabularProblem, true_returns_diff: torch.Tensor) -> torch.Tensor:
    """P(y = 1) of the Bradley-Terry oracle with label noise eta (labels flipped w.p. eta)."""
    eta = problem.label_noise
    return eta + (1 - 2 * eta) * torch.sigmoid(true_returns_diff)


def true_pair_probs(problem: TabularProblem) -> torch.Tensor:
    """Oracle P(y = 1) for every enumerated pair: (G, m, m), computed once per problem."""
    if "pair_probs" not in problem.derived:
        true = trajectory_returns(problem, problem.true_step_tables())[0]  # (G, m)
        problem.derived["pair_probs"] = preference_prob(problem, true[:, :, None] - true[:, None, :])
    return problem.derived["pair_probs"]


PAIR_CHUNK = 4_000_000  # largest pair table (seeds x pairs) built at once


def seed_chunks(problem: TabularProblem, batch: int, chunk: int = PAIR_CHUNK) -> list[slice]:
    """Slices of the seed axis whose pair tables have at most `chunk` elements (at least one seed)."""
    per_seed = max(1, chunk // true_pair_probs(problem).numel())
    return [slice(lo, lo + per_seed) for lo in range(0, batch, per_seed)]


def pair_losses(problem: TabularProblem, rewards: Tables) -> torch.Tensor:
    """BCE(p*, sigmoid(R_nu(tau) - R_nu(tau'))) for every enumerated pair: (B, G, m, m).
    Depends on nu only, so an inner solve over theta computes it once."""
    return _pair_table(trajectory_returns(problem, rewards), true_pair_probs(problem))


class PairTables(NamedTuple):
    """The pair tables of some rows' rewards (pair_tables), built once for several formulas over the same rows (the
    evaluation's F, its psi_lam and psi's inner problem): each (B, G, m, m)."""

    losses: torch.Tensor  # BCE(p*, sigmoid(R_i - R_j))
    margin_grad: torch.Tensor  # its derivative in the margin, sigmoid(R_i - R_j) - p*_ij

    def rows(self, index) -> PairTables:
        return PairTables(self.losses[index], self.margin_grad[index])


def pair_tables(problem: TabularProblem, rewards: Tables) -> PairTables | None:
    """The rows' pair tables (the same bits as each formula's own), or None when they take more than one of
    seed_chunks' chunks: there the formulas build them chunk by chunk as before, so that memory stays bounded."""
    if len(seed_chunks(problem, rewards[0].shape[0], PAIR_CHUNK)) > 1:
        return None
    with torch.no_grad():
        return _tables(trajectory_returns(problem, [r.detach() for r in rewards]), true_pair_probs(problem), True)


def _tables(returns: torch.Tensor, pair_probs: torch.Tensor, with_grad: bool) -> PairTables:
    """The BT losses of every pair from the returns (B, G, m), and with_grad their margin derivative (else None),
    computed in the tables already allocated (no autograd through it)."""
    margin = returns[..., :, None] - returns[..., None, :]
    losses = bradley_terry_nll(margin, pair_probs)
    return PairTables(losses, bradley_terry_nll_grad(margin, pair_probs, overwrite=True) if with_grad else None)


def _pair_table(returns: torch.Tensor, pair_probs: torch.Tensor) -> torch.Tensor:
    """BCE(p*, sigmoid(R(tau) - R(tau'))) of every pair from the returns (B, G, m): (B, G, m, m)."""
    return bradley_terry_nll(returns[..., :, None] - returns[..., None, :], pair_probs)


def _pair_form(prob: torch.Tensor, losses: torch.Tensor, init_prob: torch.Tensor) -> torch.Tensor:
    """E_g sum_ij prob_gi prob_gj losses_gij (B,), prob (B, G, m)."""
    return torch.einsum("bgi,bgj,bgij->bg", prob, prob, losses) @ init_prob


def expected_pair_loss(problem: TabularProblem, losses: torch.Tensor, logps: Tables) -> torch.Tensor:
    """f = E_g E_{tau, tau' ~ pi(.|g)} losses[tau, tau']: a quadratic form in the trajectory
    probabilities. (B,)"""
    prob = trajectory_probs(problem, logps)
    return _pair_form(prob.expand(losses.shape[0], *prob.shape[1:]), losses, problem.init_prob)


class _UpperLossBackward(torch.autograd.Function):
    """upper_loss on one chunk of seeds, f = E_g sum_ij p_i p_j L_ij with L_ij = BCE(p*_ij, sigmoid(R_i - R_j)),
    with the gradient in closed form instead of autograd's pass back through each op on the (B, G, m, m) tables:
      d f / d R_i = E_g p_i sum_j (G_ij - G_ji) p_j,  G = d BCE / d margin = sigmoid(R_i - R_j) - p*_ij,
      d f / d p_i = E_g sum_j (L_ij + L_ji) p_j.
    The value is the same bits as autograd's forward and the gradients equal to ~1e-16 (tests/test_exact.py). On
    the default mdp's 256 multistart rows (F-hat*), F with its gradient took 660 -> ~380 ms: fewer passes over the
    tables, and fewer of them allocated (each is a fresh 32 MB mapping, paid in page faults). A second derivative
    (create_graph, e.g. torch.autograd.functional.hessian) recomputes the tables from the inputs, so that autograd
    differentiates the backward too."""

    @staticmethod
    def forward(ctx, returns, prob, pair_probs, init_prob, pairs=None):
        # pairs: built from these returns before (pair_tables)
        losses, margin_grad = _tables(returns, pair_probs, ctx.needs_input_grad[0]) if pairs is None else pairs
        ctx.save_for_backward(returns, prob, pair_probs, init_prob, losses, margin_grad)
        return _pair_form(prob, losses, init_prob)

    @staticmethod
    def backward(ctx, grad):
        returns, prob, pair_probs, init_prob, losses, margin_grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the tables as functions of the inputs, not constants
            margin = returns[..., :, None] - returns[..., None, :]
            losses, margin_grad = bradley_terry_nll(margin, pair_probs), bradley_terry_nll_grad(margin, pair_probs)
        weight, col = (grad[:, None] * init_prob)[..., None], prob[..., None]
        d_returns = d_prob = None
        if ctx.needs_input_grad[0]:
            d_returns = weight * prob * (margin_grad @ col - margin_grad.transpose(-1, -2) @ col)[..., 0]
        if ctx.needs_input_grad[1]:
            d_prob = weight * (losses @ col + losses.transpose(-1, -2) @ col)[..., 0]
        return d_returns, d_prob, None, None, None


def upper_loss(problem: TabularProblem, rewards: Tables, logps: Tables, chunk: int = PAIR_CHUNK,
               pairs: PairTables | None = None) -> torch.Tensor:
    """f(nu, theta) = E_g E_{tau, tau' ~ pi(.|g)} BCE(p*, sigmoid(R_nu(tau) - R_nu(tau'))).

    BCE(p, sigmoid(d)) = softplus(d) - p d. Exact by enumerating pairs; seeds are processed
    in chunks so that no intermediate exceeds `chunk` elements. pairs: these rewards' pair_tables, when the
    caller built them already (then no table is built here). Returns (B,).
    """
    B = max(rewards[0].shape[0], logps[0].shape[0])
    returns = trajectory_returns(problem, [r.expand(B, *r.shape[1:]) for r in rewards])  # (B, G, m)
    prob = trajectory_probs(problem, [lp.expand(B, *lp.shape[1:]) for lp in logps])
    pair_probs = true_pair_probs(problem)
    closed_form = torch.is_grad_enabled() and (returns.requires_grad or prob.requires_grad)
    parts = []
    for part in seed_chunks(problem, B, chunk):
        r, p = returns[part], prob[part]
        built = None if pairs is None else pairs.rows(part)
        if closed_form:
            parts.append(_UpperLossBackward.apply(r, p, pair_probs, problem.init_prob, built))
        else:
            losses = _pair_table(r, pair_probs) if built is None else built.losses
            parts.append(_pair_form(p, losses, problem.init_prob))
    return torch.cat(parts)


def bilevel_objective(problem: TabularProblem, rewards: Tables, pairs: PairTables | None = None) -> torch.Tensor:
    """F(nu) = f(nu, theta*(nu)) with theta*(nu) the exact soft-optimal policy (pairs: upper_loss's). (B,)."""
    return upper_loss(problem, rewards, soft_optimal(problem, rewards)[0], pairs=pairs)


def reward_error(problem: TabularProblem, rewards: Tables) -> torch.Tensor:
    """E_g E_{tau, tau' ~ pi_ref(.|g)} (Delta R_nu - Delta R*)^2 = 2 E_g Var_ref(R_nu - R*). (B,)."""
    diff = trajectory_returns(problem, rewards) - trajectory_returns(problem, problem.true_step_tables())
    q = trajectory_probs(problem, problem.ref_log_probs())
    mean = (q * diff).sum(-1)
    var = (q * diff**2).sum(-1) - mean**2
    return 2 * var @ problem.init_prob


def kl_to_ref(problem: TabularProblem, logps: Tables) -> torch.Tensor:
    """Expected per-trajectory KL(pi || pi_ref) summed over steps: J with zero reward, negated. (B,)."""
    zero = [torch.zeros_like(lp) for lp in logps]
    return -policy_value(problem, zero, logps) / problem.beta
