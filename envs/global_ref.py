"""The global reference F* = inf F over tabular unit rewards (the one home of it) and F_loc, the
local minimum of F in the basin of the true reward. Exact by face enumeration where the problem
is a bandit over whole trajectories (bandit; token task), else a large batched multistart.

Why faces: when every trajectory pays exactly one unit and transitions are deterministic, F splits
by initial state g, F = sum_g rho(g) F_g, and per group r -> pi*_r(tau) ~ q(tau) exp(r_tau / beta)
(q = pi_ref's trajectory probability) is a bijection onto the open simplex up to a shift of r.
F_g extends continuously to the closed simplex (a pair touching a vanishing trajectory has weight
pi_tau pi_tau' -> 0 against a loss that grows like log 1/pi_tau), so inf F_g is attained in the
relative interior of some face S: min over faces of F_g's interior minimum on S, the face reached
as the rewards outside S go to -inf. On a face, r_S parametrises pi (shift-invariant) and a
multistart of the row-wise L-BFGS (envs/lbfgs.py) finds the interior minima; a row that drifts
to the face's boundary only approaches a smaller face, which is enumerated too.

The bounded class (model.reward.bound = R: every unit reward R tanh(.) in (-R, R)) is a box. F_g
is continuous on the closed box [-R, R]^m, so its infimum is attained in the relative interior of
one of the box's 3^m faces (each reward at -R, at +R or free), where the free rewards, written
R tanh(z), are stationary: the same enumeration, over box faces instead of simplex faces. The
policy stays interior (pi / pi_ref within e^(+-2R/beta) of each other), so no simplex face is
reachable. Every such face point is also a limit along which the reward network's gradient
vanishes (tanh saturates at the fixed rewards whatever their partial derivative): the audit's
stationary points of the bounded class.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import torch

from ratebench.envs.exact import true_pair_probs, bilevel_objective, bradley_terry_nll, soft_optimal
from ratebench.envs.lbfgs import minimise_rows
from ratebench.envs.tabular import DTYPE, TabularProblem
from ratebench.core.errors import ConfigError

MAX_FACE_SIZE = 12  # trajectories per group whose 2^m - 1 faces are enumerated (4095 faces)
BOX_FACE_SIZE = 8  # bounded class: trajectories per group whose 3^m box faces are enumerated (6561 faces)
SATURATED = 1e-6  # a bounded face row with a free reward within this fraction of the bound drifted to a smaller face
FACE_STATIONARY = 1e-7  # a box face row is a face point when its free rewards' partials are at most this
KKT_TOL = 1e-7  # a box-face point is a KKT point when no fixed reward's partial points inwards by more than this
START_MARGIN = 1e-3  # bounded starts: unit rewards are clipped to (1 - START_MARGIN) R before tanh is inverted
STARTS_PER_FACE = 4  # true reward on S, zero (pi_ref on S), two Gaussian draws
ENUMERATED_SIZE = 3  # larger problems: every face of at most this many trajectories ...
SAMPLED_SIZE = 8  # ... and n_starts random faces of each larger size up to this one
OFF_SUPPORT = 30.0  # finite stand-in for -inf: off-face rewards sit 30 beta below the face's lowest
INTERIOR = 1e-6  # a face row whose smallest pi on S is below this drifted to a smaller face
SOLVER_TOL = 1e-10  # gradient sup-norm at which a row stops
FACE_ITER = 300  # face rows: the face minima settle in < 100 iterations; the rest is rows drifting to a smaller face
BOX_STARTS = 3  # box face rows: true reward (clipped), zero, one Gaussian draw ...
BOX_GRID = (-0.75, -0.25, 0.25, 0.75)  # ... and every point of this grid (x R) over the face's free rewards: a face
# with several local minima has each found whatever the seed or the audit's number of starts (4^k starts, k <= m free)
BOX_ITER = 100  # box face rows: R tanh(z) rows drifting to the bound never meet the tolerance; stop them here
SAME_VALUE = 1e-8  # two end points are one minimum if their values and policies agree this closely
SAME_POLICY = 1e-4
MULTISTART_SCALES = (1.0, 3.0, 10.0)  # Gaussian starts cycle through these multiples of std(R*)
SCREEN_ITER = 20  # MDP multistart: every start runs this many iterations ...
KEEP = 8  # ... then the best KEEP continue
POLISH_ITER = 400
CONVERGED = 1e-6  # a multistart end point counts as a minimum when its gradient sup-norm is below this


@dataclass
class GlobalReference:
    value: float  # inf of F over tabular unit rewards (the richest reward class; in [-R, R] with a bound)
    argmin: torch.Tensor  # (n_units,) unit rewards attaining it (finite stand-in, OFF_SUPPORT beta off-face)
    method: str  # "exact-faces" | "exact-sequence-faces" | "exact-box-faces" | "exact-sequence-box-faces" | f"multistart-{n}"
    n_minima: int  # distinct minima found (exact: product over groups of the per-group counts)
    local_value: float  # F_loc: L-BFGS started at the TRUE reward only (the basin of nu_true)
    local_argmin: torch.Tensor  # (n_units,)
    minima_per_group: list[int] = field(default_factory=list)  # exact methods: distinct minima of each F_g
    reward_bound: float | None = None  # the class: None (unbounded tabular rewards) or R (tabular rewards in [-R, R])


def to_units(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Optimisation variables -> unit rewards of the class: x itself, or R tanh(x) (the reward model's
    own map, algorithms/models.py: bounded)."""
    return x if bound is None else bound * torch.tanh(x)


def from_units(units: torch.Tensor, bound: float | None) -> torch.Tensor:
    """A preimage of unit rewards under to_units: themselves, or atanh of them clipped to (1 - START_MARGIN) R
    (a reward outside the class starts at the nearest almost-saturated one)."""
    if bound is None:
        return units
    return torch.atanh((units / bound).clamp(-1 + START_MARGIN, 1 - START_MARGIN))


def class_start(problem: TabularProblem, bound: float | None = None) -> torch.Tensor:
    """The true reward as a point of the class, in optimisation variables (n_units,): where F_loc starts."""
    return from_units(problem.true_unit_reward, bound)


def objective_rows(problem: TabularProblem, bound: float | None = None):
    """x (B, n_units) -> F (B,): the bilevel objective of B tabular unit rewards to_units(x, bound) (what
    every multistart of F minimises: this one, the audit's landscape, F_loc)."""
    return lambda x: bilevel_objective(problem, problem.step_tables_from_units(to_units(x, bound)))


def gaussian_starts(problem: TabularProblem, n_starts: int, seed: int, scales, bound: float | None = None) -> torch.Tensor:
    """(n_starts, n_units): the true reward, zero, then Gaussian draws from a fixed generator at
    `scales` x std(R*), cycling through the scales; in optimisation variables (from_units) with a
    bound. The one home of multistart starts."""
    if n_starts < 2:
        raise ValueError(f"n_starts must be >= 2 (true reward and zero), got {n_starts}")
    gen = torch.Generator().manual_seed(seed)
    scale = float(problem.true_unit_reward.std()) or 1.0
    starts = [problem.true_unit_reward, torch.zeros(problem.n_units, dtype=DTYPE)]
    for i in range(n_starts - 2):
        starts.append(scales[i % len(scales)] * scale * torch.randn(problem.n_units, generator=gen, dtype=DTYPE))
    return from_units(torch.stack(starts), bound)


def local_reference(problem: TabularProblem, max_iter: int = 2000, bound: float | None = None) -> tuple[float, torch.Tensor]:
    """F_loc: row-wise L-BFGS on F from the true reward alone (class_start), with a small first move so
    the search stays in nu_true's basin. Returns (value, minimising unit rewards (n_units,))."""
    solved = minimise_rows(objective_rows(problem, bound), class_start(problem, bound)[None], SOLVER_TOL,
                           max_iter=max_iter, first_step=0.1)
    return float(solved.value[0]), to_units(solved.x[0], bound).clone()


# --- exact: faces of the trajectory simplex ---------------------------------------------------
@dataclass
class SequenceForm:
    """A problem whose F is a bandit over whole trajectories: per group g, trajectory tau pays unit
    unit[g, tau] only, with reference probability exp(ref_logp[g, tau]) (deterministic transitions)."""

    unit: torch.Tensor  # (G, m) long
    ref_logp: torch.Tensor  # (G, m)
    pair_probs: torch.Tensor  # (G, m, m) oracle P(tau preferred to tau')


def sequence_form(problem: TabularProblem) -> SequenceForm | None:
    """The trajectory-level bandit form of the problem, or None when its structure differs
    (stochastic transitions, several paying steps per trajectory, or a unit shared by two trajectories)."""
    table = problem.trajectory_table()
    if bool((table.log_trans != 0).any()):
        return None
    units = torch.stack([step.unit_idx[table.states[..., h], table.actions[..., h]]
                         for h, step in enumerate(problem.steps)], -1)  # (G, m, H)
    paying = units < problem.n_units
    if not bool((paying.sum(-1) == 1).all()):
        return None
    unit = torch.where(paying, units, 0).sum(-1)  # (G, m)
    if unit.unique().numel() != unit.numel():
        return None
    ref_logp = table.gather(problem.ref_log_probs())[0]  # (G, m)
    return SequenceForm(unit, ref_logp, true_pair_probs(problem))


def face_objective(form: SequenceForm, beta: float, group: torch.Tensor, face: torch.Tensor):
    """Rows (group, face of s trajectories): r (R, s) -> F_g restricted to the face, pi ~ q exp(r / beta)
    on the face and 0 off it (pairs touching an off-face trajectory have zero weight). (R,)"""
    ref = form.ref_logp[group[:, None], face]  # (R, s)
    probs = form.pair_probs[group[:, None, None], face[:, :, None], face[:, None, :]]  # (R, s, s)

    def objective(r):
        pi = torch.softmax(ref + r / beta, -1)
        losses = bradley_terry_nll(r[:, :, None] - r[:, None, :], probs)
        return torch.einsum("ri,rj,rij->r", pi, pi, losses)

    return objective


def group_objective(form: SequenceForm, beta: float, group: torch.Tensor):
    """Rows of groups: r (R, m) rewards on each row's group's trajectories -> F_g (R,), pi ~ q exp(r / beta)
    on all m trajectories."""
    return face_objective(form, beta, group, torch.arange(form.unit.shape[1]).expand(group.shape[0], -1))


def group_values(form: SequenceForm, beta: float, units: torch.Tensor) -> torch.Tensor:
    """F_g of every group at unit rewards (B, n_units): (B, G). F = group_values @ rho."""
    B, (G, m) = units.shape[0], form.unit.shape
    r = units[:, form.unit].reshape(B * G, m)
    return group_objective(form, beta, torch.arange(G).repeat(B))(r).reshape(B, G)


def face_policy(form: SequenceForm, beta: float, group: torch.Tensor, face: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """pi on all m trajectories of rows (group, face) with face rewards r (R, s): (R, m), 0 off the face."""
    pi = torch.zeros(face.shape[0], form.unit.shape[1], dtype=DTYPE)
    return pi.scatter(1, face, torch.softmax(form.ref_logp[group[:, None], face] + r / beta, -1))


@dataclass
class GroupPoints:
    """End points of face rows, one row each, for every group g's F_g: group (P,), value (P,), pi (P, m) the
    trajectory policy, r (P, m) the rewards on the group's trajectories (unbounded: OFF_SUPPORT beta below
    the face's lowest off the face), face_size (P,) (trajectories of the simplex face; free rewards of the
    box face), interior (P,) bool (the whole simplex / no reward at the bound), kkt (P,) bool (no fixed
    reward's partial derivative points into the box; True unbounded), stationary (P,) bool (a face point:
    False for a row that drifted towards a smaller face, which counts for the infimum only)."""

    group: torch.Tensor
    value: torch.Tensor
    pi: torch.Tensor
    r: torch.Tensor
    face_size: torch.Tensor
    interior: torch.Tensor
    kkt: torch.Tensor
    stationary: torch.Tensor

    def select(self, rows) -> "GroupPoints":
        return GroupPoints(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: list["GroupPoints"]) -> "GroupPoints":
        return GroupPoints(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(GroupPoints)))


def _starts(problem: TabularProblem, form: SequenceForm, group: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
            starts: int, bound: float | None) -> torch.Tensor:
    """Face starts, start-major (starts * R, s): the true reward on the face's free rewards idx (R, s),
    zero, then Gaussian draws at 1x, 3x std(R*); in optimisation variables (from_units) with a bound."""
    true = problem.true_unit_reward[form.unit[group[:, None], idx]]
    scale = float(problem.true_unit_reward.std()) or 1.0
    draws = [true, torch.zeros_like(true)]
    while len(draws) < starts:
        factor = (1.0, 3.0)[len(draws) % 2]
        draws.append(factor * scale * torch.randn(true.shape, generator=gen, dtype=DTYPE))
    return from_units(torch.cat(draws[:starts]), bound)


def solve_faces(problem: TabularProblem, form: SequenceForm, faces: torch.Tensor, gen: torch.Generator,
                starts: int = STARTS_PER_FACE) -> GroupPoints:
    """Minimise F_g on every (group, simplex face) for faces (C, s) of one size, `starts` starts each (_starts)."""
    G, m = form.unit.shape
    C, s = faces.shape
    group, face = torch.arange(G).repeat_interleave(C), faces.repeat(G, 1)  # one block: (G * C,), (G * C, s)
    x0 = _starts(problem, form, group, face, gen, starts, None)
    group, face = group.repeat(starts), face.repeat(starts, 1)
    def of_rows(rows):  # the faces' objective on some of its rows
        return face_objective(form, problem.beta, group[rows], face[rows])

    solved = minimise_rows(of_rows(slice(None)), x0, SOLVER_TOL, max_iter=FACE_ITER, rows_objective=of_rows)
    pi = face_policy(form, problem.beta, group, face, solved.x)
    r = torch.full((group.shape[0], m), 0.0, dtype=DTYPE)
    r = (r + (solved.x.amin(-1, keepdim=True) - OFF_SUPPORT * problem.beta)).scatter(1, face, solved.x)
    rows = group.shape[0]
    return GroupPoints(group, solved.value, pi, r, torch.full((rows,), s), torch.full((rows,), s == m),
                       torch.ones(rows, dtype=torch.bool),
                       (pi.gather(1, face).amin(-1) >= INTERIOR) & (solved.grad_norm <= CONVERGED))


def box_patterns(m: int, free: int) -> torch.Tensor:
    """Every box face of [-R, R]^m with `free` free rewards: (C, m) long, -1 / +1 at the bound, 0 free."""
    out = []
    for chosen in itertools.combinations(range(m), free):
        fixed = [i for i in range(m) if i not in chosen]
        for signs in itertools.product((-1, 1), repeat=len(fixed)):
            row = [0] * m
            for i, sgn in zip(fixed, signs):
                row[i] = sgn
            out.append(row)
    return torch.tensor(out, dtype=torch.long).reshape(-1, m)


def box_conditions(grad: torch.Tensor, pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of the KKT test of F over the box [-R, R]^m, per row (rows, m): (every free reward's partial
    at most FACE_STATIONARY, every reward at the bound with its partial pointing out of the box to KKT_TOL).
    pattern: +1 / -1 where the reward sits at the upper / lower bound, 0 where it is free."""
    stationary = (grad.abs() * (pattern == 0)).amax(-1) <= FACE_STATIONARY
    outward = ~(((pattern == 1) & (grad > KKT_TOL)) | ((pattern == -1) & (grad < -KKT_TOL))).any(-1)
    return stationary, outward


def solve_box_faces(problem: TabularProblem, form: SequenceForm, patterns: torch.Tensor, bound: float,
                    gen: torch.Generator, starts: int = BOX_STARTS) -> GroupPoints:
    """Minimise F_g on every (group, box face) for patterns (C, m) with the same number k of free rewards,
    the free ones written R tanh(z): `starts` starts each plus the BOX_GRID points (one evaluation when k = 0)."""
    G, m = form.unit.shape
    C = patterns.shape[0]
    group, pattern = torch.arange(G).repeat_interleave(C), patterns.repeat(G, 1)
    k = int((patterns[0] == 0).sum())
    if k:
        idx = (pattern == 0).nonzero()[:, 1].reshape(-1, k)  # (G * C, k) free rewards of each row
        grid = torch.cartesian_prod(*[torch.tensor(BOX_GRID, dtype=DTYPE)] * k).reshape(-1, k) * bound
        x0 = torch.cat([_starts(problem, form, group, idx, gen, starts, bound),
                        from_units(grid.repeat_interleave(G * C, 0), bound)])
        starts += grid.shape[0]
        group, pattern, idx = group.repeat(starts), pattern.repeat(starts, 1), idx.repeat(starts, 1)
    base = pattern.to(DTYPE) * bound
    full = group_objective(form, problem.beta, group)
    if k:
        def free_rewards(rows):  # z (rows, k) -> F_g of those rows with their free rewards R tanh(z)
            rows_full = group_objective(form, problem.beta, group[rows])
            return lambda z: rows_full(base[rows].scatter(1, idx[rows], bound * torch.tanh(z)))

        solved = minimise_rows(free_rewards(slice(None)), x0, SOLVER_TOL, max_iter=BOX_ITER,
                               rows_objective=free_rewards)
        r = base.scatter(1, idx, bound * torch.tanh(solved.x))
    else:
        r = base
    with torch.enable_grad():
        rr = r.detach().requires_grad_(True)
        value = full(rr)
        (grad,) = torch.autograd.grad(value.sum(), rr)
    # a face point: every free reward off the bound and stationary in the reward itself (the rest approach a
    # smaller face, or stopped near one: a small gradient in z there is tanh saturating, not stationarity)
    stationary, kkt = box_conditions(grad, pattern)
    if k:
        stationary &= (1 - torch.tanh(solved.x).abs()).amin(-1) >= SATURATED
    pi = torch.softmax(form.ref_logp[group] + r / problem.beta, -1)
    rows = group.shape[0]
    return GroupPoints(group, value.detach(), pi, r, torch.full((rows,), k), torch.full((rows,), k == m), kkt, stationary)


def landscape_rows(problem: TabularProblem, form: SequenceForm, bound: float | None = None, seed: int = 0) -> GroupPoints:
    """Every face row of every group (unbounded: each simplex face; bounded: each box face of [-R, R]^m),
    STARTS_PER_FACE starts each. Computed once per (bound, seed) and kept in problem.derived (F* and the
    audit's stationary points share it)."""
    key = ("landscape_rows", bound, seed)
    if key not in problem.derived:
        gen = torch.Generator().manual_seed(seed)
        m = form.unit.shape[1]
        if bound is None:
            parts = [solve_faces(problem, form, all_faces(m, size), gen) for size in range(1, m + 1)]
        else:
            parts = [solve_box_faces(problem, form, box_patterns(m, k), bound, gen) for k in range(m + 1)]
        problem.derived[key] = GroupPoints.cat(parts)
    return problem.derived[key]


def combine_faces(problem: TabularProblem, form: SequenceForm, rows: GroupPoints):
    """Best face row per group -> (value = sum_g rho(g) min F_g, argmin (n_units,), distinct face points
    (stationary rows) per group)."""
    G, m = form.unit.shape
    argmin = torch.zeros(problem.n_units, dtype=DTYPE)
    best_values, counts = [], []
    for g in range(G):
        mine = (rows.group == g).nonzero().squeeze(1)
        best = int(mine[rows.value[mine].argmin()])
        argmin[form.unit[g]] = rows.r[best]
        best_values.append(float(rows.value[best]))
        kept = mine[rows.stationary[mine]]
        counts.append(len(distinct_rows(rows.value[kept], rows.pi[kept])))
    total = float(torch.tensor(best_values, dtype=DTYPE) @ problem.init_prob)
    return total, argmin, counts


def group_stationary_points(rows: GroupPoints) -> GroupPoints:
    """The distinct face points of each group (stationary rows merged within SAME_VALUE and SAME_POLICY, the
    lowest-valued row kept), grouped by group, lowest F_g first within a group."""
    keep = []
    for g in rows.group.unique().tolist():
        mine = ((rows.group == g) & rows.stationary).nonzero().squeeze(1)
        keep += mine[distinct_rows(rows.value[mine], rows.pi[mine])].tolist()
    return rows.select(torch.tensor(keep, dtype=torch.long))


def all_faces(m: int, size: int) -> torch.Tensor:
    """Every face of `size` trajectories out of m: (C(m, size), size) long."""
    return torch.tensor(list(itertools.combinations(range(m), size)), dtype=torch.long).reshape(-1, size)


def random_faces(m: int, size: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n faces of `size` trajectories drawn uniformly (with repetition across rows): (n, size) long."""
    return torch.rand(n, m, generator=gen).argsort(-1)[:, :size].sort(-1).values


def distinct_rows(values: torch.Tensor, policies: torch.Tensor) -> list[int]:
    """Representatives of the clusters of end points (values (N,), policies (N, d)), in increasing value:
    greedy, a point joins an earlier representative within SAME_VALUE in value and SAME_POLICY in sup-norm."""
    order = torch.argsort(values)
    vals, pols = values[order].tolist(), policies[order]
    reps: list[int] = []
    for i, v in enumerate(vals):
        for j in reversed(reps):  # sorted: only the last representatives can be within SAME_VALUE
            if v - vals[j] > SAME_VALUE:
                reps.append(i)
                break
            if float((pols[i] - pols[j]).abs().max()) <= SAME_POLICY:
                break
        else:
            reps.append(i)
    return order[reps].tolist()


def distinct(values: torch.Tensor, policies: torch.Tensor) -> int:
    """Number of clusters of end points (distinct_rows)."""
    return len(distinct_rows(values, policies))


def exact_faces(problem: TabularProblem, form: SequenceForm, seed: int = 0, bound: float | None = None):
    """(value, argmin (n_units,), per-group minima counts) by enumerating every face (module docstring)."""
    return combine_faces(problem, form, landscape_rows(problem, form, bound, seed))


def sampled_faces(problem: TabularProblem, form: SequenceForm, n_starts: int, seed: int = 0):
    """Too many faces to enumerate: every face of at most ENUMERATED_SIZE trajectories and n_starts
    random faces of each size up to SAMPLED_SIZE (the full simplex is left to `multistart`).
    Returns (value, argmin, per-group counts, rows solved)."""
    gen = torch.Generator().manual_seed(seed)
    m = form.unit.shape[1]
    faces = [all_faces(m, size) for size in range(1, ENUMERATED_SIZE + 1)]
    faces += [random_faces(m, size, n_starts, gen) for size in range(ENUMERATED_SIZE + 1, min(SAMPLED_SIZE, m - 1) + 1)]
    rows = GroupPoints.cat([solve_faces(problem, form, f, gen, starts=2) for f in faces])
    value, argmin, counts = combine_faces(problem, form, rows)
    return value, argmin, counts, int(rows.value.numel())


# --- multistart -------------------------------------------------------------------------------
def multistart(problem: TabularProblem, n_starts: int, seed: int = 0, bound: float | None = None):
    """Batched multistart of the row-wise L-BFGS on F over tabular unit rewards (R tanh(x) with a bound):
    the true reward, zero, then Gaussian draws at MULTISTART_SCALES x std(R*). Every row runs SCREEN_ITER
    iterations; the KEEP best continue to convergence. Returns (values (n,), unit rewards (n, n_units),
    converged (n,) bool: gradient sup-norm <= CONVERGED)."""
    objective = objective_rows(problem, bound)
    screened = minimise_rows(objective, gaussian_starts(problem, n_starts, seed, MULTISTART_SCALES, bound), SOLVER_TOL,
                             max_iter=SCREEN_ITER, rows_objective=lambda rows: objective)
    keep = screened.value.argsort()[:KEEP]
    polished = minimise_rows(objective, screened.x[keep], SOLVER_TOL, max_iter=POLISH_ITER,
                             rows_objective=lambda rows: objective)
    values, x, grad = screened.value.clone(), screened.x.clone(), screened.grad_norm.clone()
    values[keep], x[keep], grad[keep] = polished.value, polished.x, polished.grad_norm
    return values, to_units(x, bound), grad <= CONVERGED


def policy_rows(problem: TabularProblem, x: torch.Tensor) -> torch.Tensor:
    """pi*_x as one flat row of probabilities per unit-reward row: (n, sum_h n_h A)."""
    logps, _ = soft_optimal(problem, problem.step_tables_from_units(x))
    return torch.cat([lp.exp().flatten(1) for lp in logps], 1)  # (flatten: also for n = 0 rows)


# --- the reference ----------------------------------------------------------------------------
def check_reference(problem: TabularProblem, bound: float | None = None) -> SequenceForm | None:
    """The reference of a problem with `exact_reference` (the bandit) is exact or refused: more than
    MAX_FACE_SIZE actions (BOX_FACE_SIZE with a reward bound) is a ConfigError."""
    if problem.exact_reference and problem.n_actions > MAX_FACE_SIZE:
        raise ConfigError("env.n_actions", f"the exact global reference enumerates 2^A - 1 faces per context; "
                          f"allowed: at most {MAX_FACE_SIZE} actions, got {problem.n_actions}")
    if problem.exact_reference and bound is not None and problem.n_actions > BOX_FACE_SIZE:
        raise ConfigError("model.reward.bound", f"with a reward bound the exact global reference enumerates 3^A box "
                          f"faces per context; allowed: at most {BOX_FACE_SIZE} actions (or bound null), got "
                          f"env.n_actions={problem.n_actions}")
    form = sequence_form(problem)
    if problem.exact_reference and form is None:
        raise ConfigError("env", f"the {problem.name}'s exact global reference needs one paying unit per action")
    return form


def global_reference(problem: TabularProblem, n_starts: int = 256, seed: int = 0,
                     bound: float | None = None) -> GlobalReference:
    """inf F over tabular unit rewards, in [-bound, bound] when bound is set (method recorded in the result):
    - "exact-faces" (bandit) / "exact-sequence-faces" (token task with V^L <= MAX_FACE_SIZE): every
      face of every group's trajectory simplex, STARTS_PER_FACE starts each (module docstring);
      with a bound "exact-box-faces" / "exact-sequence-box-faces": every face of every group's box
      [-R, R]^m (m <= BOX_FACE_SIZE);
    - f"multistart-{rows}" for a larger token task: every face of <= ENUMERATED_SIZE sequences,
      n_starts random faces per size up to SAMPLED_SIZE, n_starts starts on the full simplex
      (bounded: the n_starts multistart alone);
    - f"multistart-{n_starts}" (MDP): batched L-BFGS from n_starts unit-reward starts.
    Also F_loc, the minimum reached from the true reward (clipped into the box). A bandit with more
    than MAX_FACE_SIZE (bounded: BOX_FACE_SIZE) actions is refused (ConfigError)."""
    if n_starts < 2:
        raise ConfigError("n_starts", f"must be >= 2 (true reward, zero, then random), got {n_starts}")
    form = check_reference(problem, bound)
    local_value, local_argmin = local_reference(problem, bound=bound)
    limit = MAX_FACE_SIZE if bound is None else BOX_FACE_SIZE
    if form is not None and form.unit.shape[1] <= limit:
        value, argmin, counts = exact_faces(problem, form, seed, bound)
        method = ("exact-faces" if problem.horizon == 1 else "exact-sequence-faces").replace("faces", "box-faces" if bound else "faces")
        if local_value < value - 1e-9:
            raise RuntimeError(f"{method}: the local minimum {local_value:.9g} lies below the enumerated "
                               f"infimum {value:.9g}: the face search missed a minimum")
        return GlobalReference(value, argmin, method, math.prod(counts), local_value, local_argmin, counts, bound)
    values, x, converged = multistart(problem, n_starts, seed, bound)
    best = int(values.argmin())
    value, argmin, counts = float(values[best]), x[best].clone(), []
    method = f"multistart-{n_starts}"
    n_minima = distinct(values[converged], policy_rows(problem, x[converged]))  # stationary end points only
    if form is not None and bound is None:  # a large token task: faces too, searched in part
        face_value, face_argmin, counts, rows = sampled_faces(problem, form, n_starts, seed)
        method, n_minima = f"multistart-{rows + n_starts}", math.prod(counts)
        if face_value < value:
            value, argmin = face_value, face_argmin
    if local_value < value:
        value, argmin = local_value, local_argmin.clone()
    return GlobalReference(value, argmin, method, n_minima, local_value, local_argmin, counts, bound)
