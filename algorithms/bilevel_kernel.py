"""The compiled bilevel step (impl=fast): algorithms/bilevel_step.c, called through ctypes.

The C file is Bilevel.eager_step as loops over seeds; this module only lays the tensors out for it: the
environment's flat tables once per problem, the sampler's draw plans once per request list, and per step
new z, y and nu tensors that the C code writes from the state's (which are never written, as in the eager
step). Where the draws go, how they are counted and which seed draws what stay the sampler's
(CountingSampler.plan / reserve / keys): the C code reads them, it does not re-derive them.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ratebench.core.kernels import load
from ratebench.envs.sampling import flat_true_rewards

SOURCE = Path(__file__).with_name("bilevel_step.c")
MAX_LAYERS = 15  # bilevel_step.c's fixed-size buffers
I64, F64 = ctypes.c_int64, ctypes.c_double


VOIDS = ctypes.POINTER(ctypes.c_void_p)  # double ** in C: arrays of data_ptr()s, set per step without casts


class _Net(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int), ("sizes", ctypes.POINTER(I64)), ("tanh_act", ctypes.c_int),
                ("W", VOIDS), ("b", VOIDS), ("W_in", VOIDS), ("b_in", VOIDS)]


class _Plan(ctypes.Structure):
    _fields_ = [("T", I64), ("n_uniforms", I64), ("n_pairs", I64), ("columns", ctypes.POINTER(I64)),
                ("row_base", ctypes.POINTER(I64)), ("label_columns", ctypes.POINTER(I64)),
                ("first", ctypes.POINTER(I64)), ("second", ctypes.POINTER(I64))]


class _Step(ctypes.Structure):
    _fields_ = [("B", I64), ("S", I64), ("A", I64), ("H", I64), ("G", I64), ("n_units", I64),
                ("policy_x", ctypes.POINTER(F64)), ("policy_x_stride", I64),
                ("ref_logp", ctypes.POINTER(F64)), ("ref_logp_stride", I64),
                ("init_cdf", ctypes.POINTER(F64)), ("init_cdf_stride", I64),
                ("next_cdf", ctypes.POINTER(ctypes.POINTER(F64))), ("next_idx", ctypes.POINTER(ctypes.POINTER(I64))),
                ("next_k", ctypes.POINTER(I64)), ("next_stride", ctypes.POINTER(I64)),
                ("unit_of", ctypes.POINTER(I64)),
                ("unit_x", ctypes.POINTER(F64)), ("unit_x_stride", I64),
                ("true_r", ctypes.POINTER(F64)), ("true_r_stride", I64),
                ("beta", F64), ("label_noise", F64), ("reward_bound", F64), ("reward_box", F64),
                ("z", _Net), ("y", _Net), ("nu", _Net),
                ("n_traj", I64), ("n_pairs", I64), ("inner", I64),
                ("lam", F64), ("alpha", F64), ("alpha_z", F64), ("xi", F64),
                ("keys", ctypes.POINTER(I64)), ("counter", I64),
                ("stage", _Plan), ("nu_stage", _Plan), ("tables", ctypes.POINTER(F64)), ("tables_valid", I64)]


class _Segment(ctypes.Structure):
    _fields_ = [("n_steps", I64), ("k", I64), ("step_uniforms", I64), ("single_loop", I64),
                *[(name, F64) for name in ("lam0", "lam_exponent", "c_alpha", "alpha_exponent", "c_alpha_z",
                                           "alpha_z_exponent", "c_xi", "xi_exponent", "k0",
                                           "lam", "alpha", "alpha_z", "xi")],
                ("alive", ctypes.POINTER(I64)), ("died", ctypes.POINTER(I64)), ("n_threads", I64),
                ("schedule", ctypes.POINTER(F64))]


def _ptr(t: torch.Tensor, ctype=F64):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


def _table(t: torch.Tensor, dims: int, dtype=torch.float64) -> tuple[torch.Tensor, int]:
    """A table as C reads it: contiguous, and the stride of its InstanceBatch row axis (0 when shared)."""
    t = t.to(dtype).contiguous()
    return t, (t[0].numel() if t.dim() > dims else 0)


def kernel_fits(algo) -> bool:
    """Whether this bilevel configuration's networks fit the compiled step's C buffers (MAX_LAYERS)."""
    policy, reward = algo.model_cfg.policy, algo.model_cfg.reward
    return policy.depth < MAX_LAYERS and reward.depth < MAX_LAYERS


def kernel_applies(algo) -> bool:
    """Whether this bilevel configuration can take the compiled step (its C buffers' limits), and it builds."""
    return kernel_fits(algo) and load(SOURCE) is not None


class CompiledStep:
    """Built once per Bilevel: the flat tables as C reads them; call() takes one step for every seed."""

    def __init__(self, algo):
        self.lib = load(SOURCE)
        self.lib.bilevel_step.argtypes = [ctypes.POINTER(_Step)]
        self.lib.bilevel_segment.argtypes = [ctypes.POINTER(_Step), ctypes.POINTER(_Segment)]
        for name, struct in (("step_struct_size", _Step), ("segment_struct_size", _Segment)):
            size = getattr(self.lib, name)
            size.restype = I64
            if size() != ctypes.sizeof(struct):  # the two layouts of one struct: fail, never misread
                raise RuntimeError(f"bilevel_step.c's {name} is {size()} bytes, {struct.__name__} "
                                   f"{ctypes.sizeof(struct)}: their fields differ")
        problem, lay = algo.problem, algo.problem.flat()
        self.keep = []  # every tensor whose memory the C struct points into

        def hold(t):
            self.keep.append(t)
            return t

        st = self.st = _Step()
        st.S, st.A, st.H = sum(s.n_states for s in problem.steps), lay.n_actions, problem.horizon
        st.n_units = problem.unit_features.shape[-2]
        x, st.policy_x_stride = _table(algo.policy.features, 2)
        st.policy_x = _ptr(hold(x))
        ref, st.ref_logp_stride = _table(lay.ref_logp, 1)
        st.ref_logp = _ptr(hold(ref))
        init, st.init_cdf_stride = _table(lay.init_cdf, 1)
        st.init_cdf, st.G = _ptr(hold(init)), init.shape[-1]
        n_next = max(len(lay.next_cdf), 1)
        cdfs, idxs = (ctypes.POINTER(F64) * n_next)(), (ctypes.POINTER(I64) * n_next)()
        ks, strides = (I64 * n_next)(), (I64 * n_next)()
        for h, (cdf, idx) in enumerate(zip(lay.next_cdf, lay.next_idx)):
            cdf, strides[h] = _table(cdf, 2)
            idx, _ = _table(idx, 2, torch.int64)
            cdfs[h], idxs[h], ks[h] = _ptr(hold(cdf)), _ptr(hold(idx), I64), cdf.shape[-1]
        st.next_cdf, st.next_idx, st.next_k, st.next_stride = cdfs, idxs, ks, strides
        self.keep += [cdfs, idxs, ks, strides]
        st.unit_of = _ptr(hold(lay.unit_of.to(torch.int64).contiguous()), I64)
        phi, st.unit_x_stride = _table(algo.reward.features, 2)  # phi(u), or the one-hot units of a table
        st.unit_x = _ptr(hold(phi))
        true, st.true_r_stride = _table(flat_true_rewards(problem), 1)
        st.true_r = _ptr(hold(true))
        st.beta, st.label_noise = problem.beta, problem.label_noise
        st.reward_bound = 0.0 if algo.reward.bound is None else float(algo.reward.bound)  # 0: unbounded
        st.reward_box = 0.0 if algo.reward.box is None else float(algo.reward.box)  # 0: no projection
        policy, reward = algo.policy.net, algo.reward.net
        (st.z, z), (st.y, y) = self._net(policy, policy.sizes, self.keep), self._net(policy, policy.sizes, self.keep)
        st.nu, nu = self._net(reward, reward.sizes if reward is not None else [algo.reward.features.shape[-1]], self.keep)
        depth = len(policy.sizes) - 1
        self.arrays = {"z": (z, depth), "y": (y, depth), "nu": (nu, 0 if reward is None else len(reward.sizes) - 1)}
        self.plans: dict = {}
        self.lib.policy_table_size.restype = I64
        self.lib.policy_table_size.argtypes = [ctypes.POINTER(_Step)]
        self.tables, self.tables_of = None, None  # the last step's policy tables (B, size), and whose: see _tables_valid

    @staticmethod
    def _net(net, sizes: list[int], keep: list) -> tuple[_Net, list]:
        """A _Net for these layer sizes (a linear reward, net None, has no layers: W[0] is nu) and its four pointer
        arrays (W, b, W_in, b_in), which each step fills with its tensors' addresses."""
        out = _Net()
        n_layers = 0 if net is None else len(sizes) - 1
        c_sizes = (I64 * len(sizes))(*sizes)
        arrays = [(ctypes.c_void_p * max(n_layers, 1))() for _ in range(4)]
        out.n_layers, out.sizes = n_layers, c_sizes
        out.W, out.b, out.W_in, out.b_in = (ctypes.cast(a, VOIDS) for a in arrays)
        out.tanh_act = int(net is not None and net.act is torch.tanh)
        keep += [c_sizes, *arrays]
        return out, arrays

    def _plan(self, plan) -> _Plan:
        if id(plan) not in self.plans:
            columns = plan.columns.to(torch.int64).contiguous()
            row_base = torch.stack(plan.row_base).to(torch.int64).contiguous()
            tensors = [columns, row_base] + [t.to(torch.int64).contiguous()
                                             for t in (plan.label_columns, plan.first, plan.second)]
            c = _Plan(columns.shape[1], plan.n_uniforms, plan.n_pairs, *[_ptr(t, I64) for t in tensors])
            self.plans[id(plan)] = (plan, c, tensors)
        return self.plans[id(plan)][1]

    def _bind(self, state, in_place: bool) -> dict:
        """Point the struct's networks at the state's parameters: read from them and write new tensors (one step),
        or read and write copies of them in place (a segment). Returns the tensors by name (alive until the call
        returns)."""
        new = {}
        for name, (arrays, depth) in self.arrays.items():
            start = new[name + "_in"] = [p.contiguous() for p in getattr(state, name)]
            out = new[name] = ([p.clone(memory_format=torch.contiguous_format) for p in start] if in_place
                               else [torch.empty(p.shape, dtype=torch.float64) for p in start])
            if in_place:
                start = out
            W, b, W_in, b_in = arrays
            for layer in range(max(depth, 1)):  # a linear reward (depth 0): W[0] is nu
                W[layer], W_in[layer] = out[2 * layer].data_ptr(), start[2 * layer].data_ptr()
                if depth:
                    b[layer], b_in[layer] = out[2 * layer + 1].data_ptr(), start[2 * layer + 1].data_ptr()
        st = self.st
        st.B = new["z"][0].shape[0]
        st.tables_valid = int(self._tables_valid(state))
        if not st.tables_valid:
            self.tables = torch.empty(st.B, self.lib.policy_table_size(ctypes.byref(st)), dtype=torch.float64)
        st.tables = _ptr(self.tables)
        return new

    def _set_draws(self, sampler, n_traj: int, n_pairs: int, inner: int, stage_plan, nu_plan) -> None:
        st = self.st
        st.n_traj, st.n_pairs, st.inner = n_traj, n_pairs, inner
        st.keys = _ptr(sampler.keys, I64)
        st.stage, st.nu_stage = self._plan(stage_plan), self._plan(nu_plan)

    def _keep(self, state, new: dict) -> None:
        state.z, state.y, state.nu = new["z"], new["y"], new["nu"]
        self.tables_of = (state.z + state.y, [p._version for p in state.z + state.y])

    def __call__(self, state, sampler, n_traj: int, n_pairs: int, inner: int, stage_plan, nu_plan):
        """One step from `state` (its schedule already set): new z, y, nu tensors on the state."""
        st = self.st
        new = self._bind(state, in_place=False)  # the C code reads start and writes out
        self._set_draws(sampler, n_traj, n_pairs, inner, stage_plan, nu_plan)
        st.lam, st.alpha, st.alpha_z, st.xi = state.lam, state.alpha, state.alpha_z, state.xi
        st.counter = sampler.reserve([stage_plan] * inner + [nu_plan])
        if self.lib.bilevel_step(ctypes.byref(st)) != 0:
            raise RuntimeError("bilevel_step.c refused the sizes it was given (kernel_applies should have)")
        self._keep(state, new)
        return state

    def segment(self, state, sampler, n_steps: int, alive: torch.Tensor, schedule: dict, n_threads: int,
                n_traj: int, n_pairs: int, inner: int, stage_plan, nu_plan) -> tuple[int, torch.Tensor]:
        """n_steps steps from `state` in one call, seeds split across n_threads threads (bit for bit the per-step
        calls whatever n_threads). `schedule`: the single loop's constants (Bilevel.set_schedule's formulas,
        evaluated in C), or the double loop's constant lam, alpha, alpha_z, xi. A seed alive at the start whose
        parameters go non-finite is zeroed at that step (the harness's _mark_diverged).
        Returns (steps run, died (B,): 0 or the step 1..n at whose end the seed diverged). The steps run are
        n_steps, or fewer when every alive seed diverged: the step at which the last one did, where the per-step
        loop stops; only those steps' draws are counted. The state's k and schedule are not touched."""
        st, seg = self.st, _Segment()
        new = self._bind(state, in_place=True)
        self._set_draws(sampler, n_traj, n_pairs, inner, stage_plan, nu_plan)
        plans = [stage_plan] * inner + [nu_plan]
        seg.n_steps, seg.k, seg.n_threads = n_steps, state.k, n_threads
        seg.step_uniforms = sum(p.n_uniforms for p in plans)
        seg.single_loop = int("lam0" in schedule)
        for name, value in schedule.items():
            setattr(seg, name, float(value))
        alive_c = alive.to(torch.int64).contiguous()
        died = torch.zeros(st.B, dtype=torch.int64)
        scratch = torch.empty(n_steps, 4, dtype=torch.float64)
        seg.alive, seg.died, seg.schedule = _ptr(alive_c, I64), _ptr(died, I64), _ptr(scratch)
        st.counter = sampler.reserve([], 0)
        code = self.lib.bilevel_segment(ctypes.byref(st), ctypes.byref(seg))
        if code != 0:
            raise RuntimeError(f"bilevel_step.c's segment failed (code {code}: 1 sizes, 2 memory, 3 threads)")
        steps = n_steps
        if bool(alive.any()) and bool((died[alive] > 0).all()):  # every seed diverged: the loop stops there
            steps = int(died.max())
        sampler.reserve(plans, steps)
        self._keep(state, new)
        if bool((died > 0).any()):  # a seed zeroed at the segment's last step left the tables of its old parameters
            self.tables_of = None
        return steps, died

    def _tables_valid(self, state) -> bool:
        """Whether the tables the last call left are those of this state's z and y: the very tensors it returned
        (not replaced by a restore or another impl's step), not written since (the harness zeroes a diverged seed
        in place, which bumps _version)."""
        if self.tables_of is None:
            return False
        params, versions = self.tables_of
        current = state.z + state.y
        return (len(current) == len(params) and all(a is b for a, b in zip(current, params))
                and [p._version for p in current] == versions)
