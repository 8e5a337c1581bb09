"""What an algorithm is to the harness: how to initialise and how to take one step.

The harness owns the loop, counters, clock, evaluation schedule and records. An algorithm
draws samples only through the CountingSampler it is handed and never evaluates or logs.
It exposes its deployed policy and reward estimate as tables/models so the harness can score
them exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch

from ratebench.algorithms.models import Params, RewardModel
from ratebench.core.kernels import start_build
from ratebench.envs.tabular import TabularProblem


IMPLS = ("fast", "eager", "reference")  # impl=: how a step is computed, never what it computes (docs/fast.md):
# fast = compiled C where an algorithm has it (bilevel), else eager; eager = torch with closed-form gradients;
# reference = autograd through the surrogates, as the paper writes the step


STEP_METHODS = {"reference": "reference_step", "eager": "eager_step", "compiled": "kernel_step"}  # step_path -> method


class Algorithm:
    name: ClassVar[str]  # the name it is registered under (its entry point's name; Config's `name` default)
    Config: ClassVar[type]
    # the knobs (fields of Config) that size one step's sample batches per estimate: the harness's memory
    # estimate before any allocation (harness/bounds.py) reads their values through step_batches()
    step_batch_knobs: ClassVar[tuple[str, ...]] = ()
    # True when model.reward is the reward network this algorithm trains: model.reward.bound applies to it
    trains_model_reward: ClassVar[bool] = False
    # True when its nu step projects a tabular model.reward onto the box (model.reward.bound_reading=project)
    projects_model_reward: ClassVar[bool] = False
    # True when the method is handed the true reward (no estimate): its reward tables are the truth, so the
    # saturation check of pi*_nu (an estimate's soft-optimal policy underflowing) does not apply to it
    uses_true_reward: ClassVar[bool] = False
    impl: str = "fast"  # set from the run config; step_path() says which step it selects

    def __init__(self, cfg: Any, model_cfg: Any, problem: TabularProblem):
        if hasattr(cfg, "check"):  # range checks also when built directly, not through the CLI
            cfg.check()
        self.cfg, self.model_cfg, self.problem = cfg, model_cfg, problem

    @classmethod
    def step_batches(cls, cfg: Any) -> dict[str, int]:
        """{knob: value} of the knobs that size a step's sample batches (step_batch_knobs), from the config alone."""
        return {k: int(getattr(cfg, k, 0) or 0) for k in cls.step_batch_knobs}

    def init(self, seeds: list[int]) -> Any:
        """Initial state for a batch of seeds (parameters stacked on a leading seed axis)."""
        raise NotImplementedError

    def step(self, state: Any, sampler) -> Any:
        """One outer iteration; returns the new state: the method step_path() names (STEP_METHODS)."""
        return getattr(self, STEP_METHODS[self.step_path()])(state, sampler)

    def step_path(self) -> str:
        """The one place impl chooses the step (run.json's provenance records it): "compiled" (kernel_step, C)
        under impl=fast where has_kernel_step(); "eager" (eager_step, closed-form torch) under impl=fast or
        eager where has_eager_step(); else "reference" (reference_step, autograd)."""
        if self.impl == "reference" or not self.has_eager_step():
            return "reference"
        return "compiled" if self._tries_kernel() and self.has_kernel_step() else "eager"

    def _tries_kernel(self) -> bool:
        """step_path() asks for the compiled step (has_kernel_step: built on first use): impl=fast with an eager step."""
        return self.impl == "fast" and self.has_eager_step()

    def reference_step(self, state: Any, sampler) -> Any:
        """The step as the paper writes it (autograd through the surrogates): what the other steps must equal."""
        raise NotImplementedError

    @classmethod
    def premise_inputs(cls, cfg: dict) -> dict | None:
        """What `check` audits this algorithm's premises with, from its config as a run records it ({}: the
        defaults): {"c_lam": the penalty schedule's growth exponent, "schedule_applies": whether that schedule
        runs}; None when the algorithm states no premise to audit."""
        return None

    @staticmethod
    def instance_batch_refusal(cfg: Any) -> str | None:
        """Why this configuration cannot step an InstanceBatch (several instances as batch rows), or None when it
        can: its step touches the environment only through the sampler and the networks' tables, so a row
        computes on its own instance's tables what a separate job would (tests/test_instance_batch.py)."""
        return None

    @staticmethod
    def impl_refusal(cfg: Any, impl: str) -> str | None:
        """Why this configuration cannot run with `impl` ("reference", "eager", "fast"), or None when it can. Most
        configurations can with any: a path they lack falls back to the next (Algorithm.step_path); one that has only
        its reference step and must not be recorded under another impl's name says so here (checked before compute)."""
        return None

    def has_eager_step(self) -> bool:
        """True if this configuration has an eager step (equal to the reference step to round-off)."""
        return False

    def eager_step(self, state: Any, sampler) -> Any:
        """reference_step in fewer kernel calls (closed-form gradients, one RNG call), where has_eager_step()."""
        raise NotImplementedError

    def has_kernel_step(self) -> bool:
        """True if this configuration has a compiled step (C, built on first use) equal to the eager step."""
        return False

    def kernel_step(self, state: Any, sampler) -> Any:
        """eager_step compiled, where has_kernel_step()."""
        raise NotImplementedError

    def kernel_sources(self) -> list[Path]:
        """The C files has_kernel_step() builds and loads (core/kernels.load) for this configuration; [] = none."""
        return []

    def start_kernel_build(self) -> list[str]:
        """Start building the compiled step step_path() will load (core/kernels.start_build), without waiting: the
        harness calls it before it solves F-hat*, so that the two overlap. The names of the sources whose builds
        started."""
        if not self._tries_kernel():
            return []
        return [source.name for source in self.kernel_sources() if start_build(source)]

    def segment_samples(self, state: Any) -> int | None:
        """Samples every step of a segment draws when this configuration runs segments (run_segment), else None.
        A segment's steps draw a fixed number each, so the harness knows how many steps reach a sample count."""
        return None

    def run_segment(self, state: Any, sampler, n_steps: int, alive: torch.Tensor) -> tuple[Any, int, torch.Tensor]:
        """n_steps steps in one call, where segment_samples() is not None: what n_steps step() calls followed each
        by the harness's non-finite check (_mark_diverged) compute, bit for bit. alive (B,) bool: the seeds alive at
        the start (read only). Returns (state, steps run, died (B,) int64: 0, or the step 1..steps at whose end the
        seed went non-finite and was zeroed). Steps run < n_steps only when every alive seed diverged: the step
        at which the last one did. `step_threads` threads share the seeds."""
        raise NotImplementedError

    step_threads: int = 1  # threads of a segment (run_segment); set by the harness from the config

    def policy_log_probs(self, state: Any) -> list[torch.Tensor]:
        """The deployed policy as per-step log-prob tables [(B, n_h, A)]."""
        raise NotImplementedError

    def stacked_policy_log_probs(self, states: list) -> list[torch.Tensor]:
        """policy_log_probs of several states of the same seeds (evaluation points the harness scores together), their
        rows stacked in order: [(sum B_i, n_h, A)]. An algorithm whose deployed policy is a network of per-row
        parameters overrides it to run the network once on every row."""
        return stack_rows([self.policy_log_probs(s) for s in states])

    def reward_model(self, state: Any) -> tuple[RewardModel, Params] | None:
        """(model, parameters nu) of the reward estimate, or None if no nu exists."""
        return None

    def implicit_rewards(self, state: Any) -> list[torch.Tensor] | None:
        """Step reward tables of an implicit reward estimate (e.g. DPO's beta log pi/pi_ref)."""
        return None

    def schedule(self, state: Any) -> dict[str, float]:
        """Step sizes / penalty actually used at the last step, for the records."""
        return {}

    def predicted_metrics(self, state: Any) -> dict[str, float]:
        """{column: value}: what the algorithm can compute exactly about a metric at this state from its schedule
        alone, such as `<metric>_noise`, the noise term the metric's rate is the rate of (analysis/noise_term.py).
        The harness calls it at evaluation points and records each value beside the metrics; {} = none."""
        return {}

    def population_targets(self, reference) -> dict:
        """{"target": PopulationTarget, ...}: what this configuration converges to with infinite data
        from its own sampling scheme (algorithms/targets.py), given the problem's GlobalReference.
        "target" is the one its excess metric is measured against; {} = none is known."""
        return {}

    def tensors(self, state: Any) -> dict[str, torch.Tensor]:
        """Every per-seed parameter tensor of the state (leading axis B), for divergence checks;
        the harness may overwrite slices of diverged seeds in place. Derived from the state
        dataclass: each tensor field, and each list-of-tensors field as `<field>.<i>`."""
        named = {}
        for name in _field_names(type(state)):  # (the harness reads this at every evaluation point: no comprehensions)
            value = getattr(state, name)
            if isinstance(value, torch.Tensor):
                named[name] = value
            elif isinstance(value, list) and value and _all_tensors(value):
                for key, t in zip(_item_names(name, len(value)), value):
                    named[key] = t
        return named

    def select_rows(self, state: Any, rows: slice) -> Any:
        """The state of batch rows `rows` only (copies of every per-row tensor; scalars, datasets and RNGs as they
        are): what one instance's evaluator reads of a batched instance family's state. Generic over
        dataclass states whose per-row tensors lead with the row axis, alone or in lists. Copies, not views: a
        kernel may sum in another order on a view that starts mid-storage, and the evaluation must be the
        instance job's to the last bit."""
        every = rows == slice(None)  # the harness's copy of a whole state at each evaluation point: no index first
        copies = {}  # the fields that hold per-row tensors; the others stay as they are
        for name in _field_names(type(state), True):
            value = getattr(state, name)
            if isinstance(value, torch.Tensor):
                if value.dim():
                    copies[name] = value.clone() if every else value[rows].clone()
            elif isinstance(value, list) and value and _all_tensors(value):
                copies[name] = [v if not v.dim() else v.clone() if every else v[rows].clone() for v in value]
        return dataclasses.replace(state, **copies)

    def state_dict(self, state: Any) -> dict:
        """The whole state as plain containers of tensors, numbers and strings, loadable with
        torch.load(weights_only=True). Generic over dataclass states (override if needed)."""
        return {"state": encode_state(state)}

    def load_state_dict(self, state: Any, saved: dict) -> Any:
        """Restore `saved` into a fresh `init(seeds)` state (same seeds); returns the state."""
        return decode_state(saved["state"], state)


_CLASS, _FIELDS, _OBJECT = "__class__", "__fields__", "__state_dict__"


def stack_rows(per_state: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-state lists of (B_i, ...) tensors (parameters, tables) -> one list of (sum B_i, ...) tensors, the states'
    rows in order (a single state's list as it is): several evaluation points scored as one batch."""
    return per_state[0] if len(per_state) == 1 else [torch.cat(parts) for parts in zip(*per_state)]


def _all_tensors(values: list) -> bool:
    for value in values:
        if not isinstance(value, torch.Tensor):
            return False
    return True


@functools.cache
def _item_names(name: str, n: int) -> tuple[str, ...]:
    """tensors()' keys of a list field's items: `<field>.<i>`."""
    return tuple(f"{name}.{i}" for i in range(n))


@functools.cache
def _field_names(cls: type, init_only: bool = False) -> tuple[str, ...]:
    """The fields of a state dataclass (those its __init__ takes, with init_only), looked up once per class: the
    harness reads and copies states at every evaluation point."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init or not init_only)


def encode_state(value: Any) -> Any:
    """Tensors, numbers, strings, lists/tuples, dataclasses (by field) and objects with a
    state_dict() (e.g. CounterRng) -> nested dicts/lists of weights_only-safe values."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {_CLASS: f"{cls.__module__}:{cls.__qualname__}",
                _FIELDS: {f.name: encode_state(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        return {_OBJECT: value.state_dict()}
    raise TypeError(f"cannot checkpoint a state value of type {type(value).__name__}; "
                    "give the algorithm its own state_dict()/load_state_dict()")


def decode_state(saved: Any, template: Any) -> Any:
    """Inverse of encode_state. `template` is the matching value of a fresh state: dataclasses are
    filled in place, objects with load_state_dict() are restored in place (their seed keys come
    from the template), a dataclass the template lacks (None) is rebuilt from its class."""
    if isinstance(saved, dict) and _OBJECT in saved:
        template.load_state_dict(saved[_OBJECT])
        return template
    if isinstance(saved, dict) and _CLASS in saved:
        cls = template.__class__ if dataclasses.is_dataclass(template) else _ratebench_class(saved[_CLASS])
        values = {name: decode_state(v, getattr(template, name, None)) for name, v in saved[_FIELDS].items()}
        if dataclasses.is_dataclass(template):
            for name, v in values.items():
                setattr(template, name, v)
            return template
        return cls(**values)
    if isinstance(saved, list):
        items = list(template) if isinstance(template, (list, tuple)) else []
        decoded = [decode_state(v, items[i] if i < len(items) else None) for i, v in enumerate(saved)]
        return tuple(decoded) if isinstance(template, tuple) else decoded
    return saved


def _ratebench_class(path: str) -> type:
    """A dataclass named in a checkpoint; only ratebench's own classes are ever imported."""
    module, _, qualname = path.partition(":")
    if not module.startswith("ratebench."):
        raise ValueError(f"checkpoint names a class outside ratebench: {path!r}")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"checkpoint names {path!r}, which is not a dataclass")
    return obj
