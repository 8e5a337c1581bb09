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
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from ratebench.envs.exact import true_pair_probs, bilevel_objective, bradley_terry_nll, soft_optimal
from ratebench.envs.lbfgs import minimise_rows
from ratebench.envs.tabular import DTYPE, TabularProblem, gather_shared
from ratebench.errors import ConfigError

MAX_FACE_SIZE = 12  # trajectories per group whose 2^m - 1 faces are enumerated (4095 faces)
STARTS_PER_FACE = 4  # true reward on S, zero (pi_ref on S), two Gaussian draws
ENUMERATED_SIZE = 3  # larger problems: every face of at most this many trajectories ...
SAMPLED_SIZE = 8  # ... and n_starts random faces of each larger size up to this one
OFF_SUPPORT = 30.0  # finite stand-in for -inf: off-face rewards sit 30 beta below the face's lowest
INTERIOR = 1e-6  # a face row whose smallest pi on S is below this drifted to a smaller face
SOLVER_TOL = 1e-10  # gradient sup-norm at which a row stops
FACE_ITER = 300  # face rows: the face minima settle in < 100 iterations; the rest is rows drifting to a smaller face
SAME_VALUE = 1e-8  # two end points are one minimum if their values and policies agree this closely
SAME_POLICY = 1e-4
MULTISTART_SCALES = (1.0, 3.0, 10.0)  # Gaussian starts cycle through these multiples of std(R*)
SCREEN_ITER = 20  # MDP multistart: every start runs this many iterations ...
KEEP = 8  # ... then the best KEEP continue
POLISH_ITER = 400
CONVERGED = 1e-6  # a multistart end point counts as a minimum when its gradient sup-norm is below this


@dataclass
class GlobalReference:
    value: float  # inf of F over tabular unit rewards (the richest reward class)
    argmin: torch.Tensor  # (n_units,) unit rewards attaining it (finite stand-in, OFF_SUPPORT beta off-face)
    method: str  # "exact-faces" | "exact-sequence-faces" | f"multistart-{n}"
    n_minima: int  # distinct minima found (exact: product over groups of the per-group counts)
    local_value: float  # F_loc: L-BFGS started at the TRUE reward only (the basin of nu_true)
    local_argmin: torch.Tensor  # (n_units,)
    minima_per_group: list[int] = field(default_factory=list)  # exact methods: distinct minima of each F_g


def objective_rows(problem: TabularProblem):
    """x (B, n_units) -> F (B,): the bilevel objective of B tabular unit rewards (what every
    multistart of F minimises: this one, the audit's landscape, F_loc)."""
    return lambda x: bilevel_objective(problem, problem.step_tables_from_units(x))


def gaussian_starts(problem: TabularProblem, n_starts: int, seed: int, scales) -> torch.Tensor:
    """(n_starts, n_units): the true reward, zero, then Gaussian draws from a fixed generator at
    `scales` x std(R*), cycling through the scales. The one home of multistart starts."""
    if n_starts < 2:
        raise ValueError(f"n_starts must be >= 2 (true reward and zero), got {n_starts}")
    gen = torch.Generator().manual_seed(seed)
    scale = float(problem.true_unit_reward.std()) or 1.0
    starts = [problem.true_unit_reward, torch.zeros(problem.n_units, dtype=DTYPE)]
    for i in range(n_starts - 2):
        starts.append(scales[i % len(scales)] * scale * torch.randn(problem.n_units, generator=gen, dtype=DTYPE))
    return torch.stack(starts)


def local_reference(problem: TabularProblem, max_iter: int = 2000) -> tuple[float, torch.Tensor]:
    """F_loc: row-wise L-BFGS on F from the true reward alone, with a small first move so the
    search stays in nu_true's basin. Returns (value, minimising unit rewards (n_units,))."""
    solved = minimise_rows(objective_rows(problem), problem.true_unit_reward[None], SOLVER_TOL,
                           max_iter=max_iter, first_step=0.1)
    return float(solved.value[0]), solved.x[0].clone()


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
    ref_logp = gather_shared(problem.ref_log_probs(), table.states, table.actions)[0]  # (G, m)
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


def face_policy(form: SequenceForm, beta: float, group: torch.Tensor, face: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """pi on all m trajectories of rows (group, face) with face rewards r (R, s): (R, m), 0 off the face."""
    pi = torch.zeros(face.shape[0], form.unit.shape[1], dtype=DTYPE)
    return pi.scatter(1, face, torch.softmax(form.ref_logp[group[:, None], face] + r / beta, -1))


@dataclass
class FaceRows:
    """End points of face rows: group (R,), face (R, s), r (R, s), value (R,), pi (R, m)."""

    group: torch.Tensor
    face: torch.Tensor
    r: torch.Tensor
    value: torch.Tensor
    pi: torch.Tensor


def solve_faces(problem: TabularProblem, form: SequenceForm, faces: torch.Tensor, gen: torch.Generator,
                starts: int = STARTS_PER_FACE) -> FaceRows:
    """Minimise F_g on every (group, face) for faces (C, s) of one size, `starts` starts each: the
    true reward on the face, zero (pi_ref on the face), then Gaussian draws at 1x, 3x std(R*)."""
    G = form.unit.shape[0]
    C, s = faces.shape
    group, face = torch.arange(G).repeat_interleave(C), faces.repeat(G, 1)  # one block: (G * C,), (G * C, s)
    true = problem.true_unit_reward[form.unit[group[:, None], face]]
    scale = float(problem.true_unit_reward.std()) or 1.0
    draws = [true, torch.zeros_like(true)]
    while len(draws) < starts:
        factor = (1.0, 3.0)[len(draws) % 2]
        draws.append(factor * scale * torch.randn(true.shape, generator=gen, dtype=DTYPE))
    x0 = torch.cat(draws[:starts])  # (starts * G * C, s), start-major
    group, face = group.repeat(starts), face.repeat(starts, 1)
    solved = minimise_rows(face_objective(form, problem.beta, group, face), x0, SOLVER_TOL, max_iter=FACE_ITER)
    return FaceRows(group, face, solved.x, solved.value, face_policy(form, problem.beta, group, face, solved.x))


def combine_faces(problem: TabularProblem, form: SequenceForm, rows: list[FaceRows]):
    """Best face row per group -> (value = sum_g rho(g) min F_g, argmin (n_units,) with the off-face
    rewards OFF_SUPPORT beta below the face, distinct interior minima per group)."""
    G, m = form.unit.shape
    argmin = torch.zeros(problem.n_units, dtype=DTYPE)
    best_values, counts = [], []
    for g in range(G):
        values, pis, best = [], [], (math.inf, None, None)
        for part in rows:
            mine = part.group == g
            v, pi, face, r = part.value[mine], part.pi[mine], part.face[mine], part.r[mine]
            if v.numel() and float(v.min()) < best[0]:
                i = int(v.argmin())
                best = (float(v[i]), face[i], r[i])
            on_face = pi.gather(1, face)
            interior = on_face.amin(-1) >= INTERIOR  # the others drifted towards a smaller face
            values.append(v[interior])
            pis.append(pi[interior])
        value, face, r = best
        rg = torch.full((m,), float(r.min()) - OFF_SUPPORT * problem.beta, dtype=DTYPE)
        rg[face] = r
        argmin[form.unit[g]] = rg
        best_values.append(value)
        counts.append(distinct(torch.cat(values), torch.cat(pis)))
    total = float(torch.tensor(best_values, dtype=DTYPE) @ problem.init_prob)
    return total, argmin, counts


def all_faces(m: int, size: int) -> torch.Tensor:
    """Every face of `size` trajectories out of m: (C(m, size), size) long."""
    return torch.tensor(list(itertools.combinations(range(m), size)), dtype=torch.long).reshape(-1, size)


def random_faces(m: int, size: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n faces of `size` trajectories drawn uniformly (with repetition across rows): (n, size) long."""
    return torch.rand(n, m, generator=gen).argsort(-1)[:, :size].sort(-1).values


def distinct(values: torch.Tensor, policies: torch.Tensor) -> int:
    """Number of clusters of end points (values (N,), policies (N, d)): greedy in increasing value,
    a point joins an earlier representative within SAME_VALUE in value and SAME_POLICY in sup-norm."""
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
    return len(reps)


def exact_faces(problem: TabularProblem, form: SequenceForm, seed: int = 0):
    """(value, argmin (n_units,), per-group minima counts) by enumerating every face (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    m = form.unit.shape[1]
    rows = [solve_faces(problem, form, all_faces(m, size), gen) for size in range(1, m + 1)]
    return combine_faces(problem, form, rows)


def sampled_faces(problem: TabularProblem, form: SequenceForm, n_starts: int, seed: int = 0):
    """Too many faces to enumerate: every face of at most ENUMERATED_SIZE trajectories and n_starts
    random faces of each size up to SAMPLED_SIZE (the full simplex is left to `multistart`).
    Returns (value, argmin, per-group counts, rows solved)."""
    gen = torch.Generator().manual_seed(seed)
    m = form.unit.shape[1]
    faces = [all_faces(m, size) for size in range(1, ENUMERATED_SIZE + 1)]
    faces += [random_faces(m, size, n_starts, gen) for size in range(ENUMERATED_SIZE + 1, min(SAMPLED_SIZE, m - 1) + 1)]
    rows = [solve_faces(problem, form, f, gen, starts=2) for f in faces]
    value, argmin, counts = combine_faces(problem, form, rows)
    return value, argmin, counts, sum(int(r.value.numel()) for r in rows)


# --- multistart -------------------------------------------------------------------------------
def multistart(problem: TabularProblem, n_starts: int, seed: int = 0):
    """Batched multistart of the row-wise L-BFGS on F over tabular unit rewards: the true reward,
    zero, then Gaussian draws at MULTISTART_SCALES x std(R*). Every row runs SCREEN_ITER
    iterations; the KEEP best continue to convergence. Returns (values (n,), x (n, n_units),
    converged (n,) bool: gradient sup-norm <= CONVERGED)."""
    objective = objective_rows(problem)
    screened = minimise_rows(objective, gaussian_starts(problem, n_starts, seed, MULTISTART_SCALES), SOLVER_TOL,
                             max_iter=SCREEN_ITER)
    keep = screened.value.argsort()[:KEEP]
    polished = minimise_rows(objective, screened.x[keep], SOLVER_TOL, max_iter=POLISH_ITER)
    values, x, grad = screened.value.clone(), screened.x.clone(), screened.grad_norm.clone()
    values[keep], x[keep], grad[keep] = polished.value, polished.x, polished.grad_norm
    return values, x, grad <= CONVERGED


def policy_rows(problem: TabularProblem, x: torch.Tensor) -> torch.Tensor:
    """pi*_x as one flat row of probabilities per unit-reward row: (n, sum_h n_h A)."""
    logps, _ = soft_optimal(problem, problem.step_tables_from_units(x))
    return torch.cat([lp.exp().reshape(x.shape[0], -1) for lp in logps], 1)


# --- the reference ----------------------------------------------------------------------------
def check_reference(problem: TabularProblem) -> SequenceForm | None:
    """The bandit's reference is exact or refused: more than MAX_FACE_SIZE actions is a ConfigError."""
    if problem.name == "bandit" and problem.n_actions > MAX_FACE_SIZE:
        raise ConfigError("env.n_actions", f"the exact global reference enumerates 2^A - 1 faces per context; "
                          f"allowed: at most {MAX_FACE_SIZE} actions, got {problem.n_actions}")
    form = sequence_form(problem)
    if problem.name == "bandit" and form is None:
        raise ConfigError("env", "the bandit's exact global reference needs one paying unit per action")
    return form


def global_reference(problem: TabularProblem, n_starts: int = 256, seed: int = 0) -> GlobalReference:
    """inf F over tabular unit rewards (method recorded in the result):
    - "exact-faces" (bandit) / "exact-sequence-faces" (token task with V^L <= MAX_FACE_SIZE): every
      face of every group's trajectory simplex, STARTS_PER_FACE starts each (module docstring);
    - f"multistart-{rows}" for a larger token task: every face of <= ENUMERATED_SIZE sequences,
      n_starts random faces per size up to SAMPLED_SIZE, n_starts starts on the full simplex;
    - f"multistart-{n_starts}" (MDP): batched L-BFGS from n_starts unit-reward starts.
    Also F_loc, the minimum reached from the true reward. A bandit with more than MAX_FACE_SIZE
    actions is refused (ConfigError)."""
    if n_starts < 2:
        raise ConfigError("n_starts", f"must be >= 2 (true reward, zero, then random), got {n_starts}")
    form = check_reference(problem)
    local_value, local_argmin = local_reference(problem)
    if form is not None and form.unit.shape[1] <= MAX_FACE_SIZE:
        value, argmin, counts = exact_faces(problem, form, seed)
        method = "exact-faces" if problem.horizon == 1 else "exact-sequence-faces"
        if local_value < value - 1e-9:
            raise RuntimeError(f"{method}: the local minimum {local_value:.9g} lies below the enumerated "
                               f"infimum {value:.9g}: the face search missed a minimum")
        return GlobalReference(value, argmin, method, math.prod(counts), local_value, local_argmin, counts)
    values, x, converged = multistart(problem, n_starts, seed)
    best = int(values.argmin())
    value, argmin, counts = float(values[best]), x[best].clone(), []
    method = f"multistart-{n_starts}"
    n_minima = distinct(values[converged], policy_rows(problem, x[converged]))  # stationary end points only
    if form is not None:  # a large token task: faces too, searched in part
        face_value, face_argmin, counts, rows = sampled_faces(problem, form, n_starts, seed)
        method, n_minima = f"multistart-{rows + n_starts}", math.prod(counts)
        if face_value < value:
            value, argmin = face_value, face_argmin
    if local_value < value:
        value, argmin = local_value, local_argmin.clone()
    return GlobalReference(value, argmin, method, n_minima, local_value, local_argmin, counts)
