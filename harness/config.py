"""Structured run configuration (Hydra schemas) and the validation done before any compute."""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ratebench.algorithms import ALGORITHMS
from ratebench.algorithms.base import IMPLS
from ratebench.algorithms.models import ModelConfig, NetConfig, check_net
from ratebench.bounds import check_bounds
from ratebench.envs import ENVIRONMENTS
from ratebench.core.errors import ConfigError
from ratebench.health import HealthConfig, check_health
from ratebench.live_log import check_logger
from ratebench.core.records import OBJECTIVES, OPERATIONAL_KEYS, code_fingerprint, config_hash


@dataclass
class BudgetConfig:
    samples: int = 20_000  # stop when the sample counter reaches this (README.md)
    steps: Optional[int] = None  # also stop after this many outer steps; when set, the evaluation points are
    #                             log-spaced in steps (fit with --x step). Needed by runs that draw no samples
    #                             (algorithm.oracle=exact)
    evals_per_decade: int = 10  # log-spaced evaluation points in samples (in steps under budget.steps), plus the final one


@dataclass
class RunConfig:
    env: Any = MISSING  # chosen by env=<bandit|mdp|token>
    algorithm: Any = MISSING  # chosen by algorithm=<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    seeds: List[int] = field(default_factory=lambda: list(range(8)))  # algorithm seeds, batched in one process
    n_seeds: Optional[int] = None  # shorthand: seeds = 0..n_seeds-1 (overrides `seeds`)
    threads: int = 1  # torch threads per job: 1 keeps two parallel jobs off each other's core
    # threads of a compiled segment of steps (impl=fast, bilevel: seeds split across them; docs/fast.md); 0 = every
    # core this process may use. Cannot change a result: each seed owns its RNG stream and memory
    step_threads: int = 0
    cache_dir: Optional[str] = None  # F-hat* cache; default $RATEBENCH_CACHE or ~/.cache/ratebench
    progress: bool = True  # a live progress line per job (off under CI=true)
    checkpoint_every_s: float = 180.0  # save checkpoint.pt at least this often (0 = at every evaluation point)
    # env.instance_seed values whose results chose this configuration's constants (an experiment file
    # names them); `check` never counts runs on them as evidence for a claim. Cannot change a result.
    tuning_instances: List[int] = field(default_factory=list)
    # config keys (dotted; a parent frees its subtree) whose value may differ between this experiment's runs
    # and its file without the runs ceasing to be its evidence for a claim (docs/analysis.md "What counts as
    # evidence"); seeds, instances and the operational keys are always free. Cannot change a result.
    free_keys: List[str] = field(default_factory=list)
    overwrite: bool = False  # allow a run folder that holds a finished run of ANOTHER config to be replaced
    logger: str = "none"  # live logging while the run goes: none | tensorboard (<run folder>/tensorboard/, the
    #                       `tensorboard` extra); cannot change a result
    # how a step is computed: fast (closed-form gradients, one RNG call per step; equal to reference to
    # float64 round-off per step, tests/test_fast.py) or reference (the autograd path that reads like
    # docs/bilevel.md). In the hashes: at tiny batches the method amplifies round-off, so a seed's long run
    # differs between the two (docs/fast.md). Algorithms without a fast path run the reference.
    impl: str = "fast"
    # what a job returns to Hydra's sweeper (the Optuna sweeper minimises it: docs/sweeps.md "Tuning"): null
    # (0.0) or a metric column, then the mean over seeds of its final value. Cannot change a result.
    objective: Optional[str] = None
    # env.instance_seed values run as ONE batched job (rows = instances x seeds, one step for all; docs/fast.md
    # "Instances as a batch axis"). Each instance writes <run dir>/instance_<k>/, the folder its own job
    # (env.instance_seed=k) would write, with the same run_hash and metrics. null: the one env.instance_seed.
    instances: Optional[List[int]] = None
    # when a seed stops counting as `completed`: `saturated` (left the region where the exact metrics and the
    # analysis apply) or `stalled` (stopped moving); docs/metrics.md "Seed health"
    health: HealthConfig = field(default_factory=HealthConfig)


def register() -> None:
    """The resolvers and the ConfigStore's schemas and presets that conf/config.yaml composes with. Stored again only
    when what they are made of changed (the registered algorithms and environments, the conf folders, the store
    itself): each store converts a dataclass to a config, ~40 ms for all of them, which every new compose paid."""
    from ratebench.core.registry import conf_folders
    from ratebench.plugin_config import SEARCH_PATH_RESOLVER, register_presets

    cs = ConfigStore.instance()
    stored = (id(cs), _registered(), tuple(conf_folders()))
    if (stored == _REGISTERED.get("key") and "run_schema.yaml" in cs.repo
            and all(OmegaConf.has_resolver(name) for name in ("rb_job_id", "rb_run_help", SEARCH_PATH_RESOLVER))):
        return
    if not OmegaConf.has_resolver("rb_job_id"):
        OmegaConf.register_new_resolver("rb_job_id", job_id)  # hydra.sweep.subdir (conf/config.yaml)
    if not OmegaConf.has_resolver("rb_run_help"):
        from ratebench.core.catalog import run_help

        OmegaConf.register_new_resolver("rb_run_help", run_help)  # hydra.help.template (conf/config.yaml)
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    for name, spec in ENVIRONMENTS.items():
        cs.store(group="env", name=f"{name}_schema", node=spec.Config)
    for name, algo in ALGORITHMS.items():
        cs.store(group="algorithm", name=f"{name}_schema", node=algo.Config)
    register_presets(cs)  # a plug-in without a preset file is selectable by its name (env=<name>, algorithm=<name>)
    _REGISTERED["key"] = stored


_REGISTERED: dict[str, tuple] = {}  # what register() last stored the schemas and presets for


def _registered() -> tuple:
    """The registered algorithms and environments, by name and object identity."""
    return tuple((kind, name, id(item)) for kind, registry in (("algorithm", ALGORITHMS), ("env", ENVIRONMENTS))
                 for name, item in registry.items())


def compose(overrides=(), with_hydra: bool = False) -> DictConfig:
    """The run config `ratebench run <overrides>` would build (Python API, tests, CLI checks);
    `hydra:` (output folders, launcher) only when with_hydra. A copy of the one composed before for the same
    _compose_key, if any: Hydra's composition takes ~0.1 s, and `check`, `report`, `audit` and a sweep's checks
    compose the same experiments again and again (a copy: the caller may change it)."""
    from hydra import compose as hydra_compose, initialize_config_module

    key = _compose_key(overrides, with_hydra)
    if key not in _COMPOSED:
        files = key[-1]  # every YAML file of the conf folders, as _compose_key read them
        values = None if with_hydra else _value_overrides(overrides, files)
        if values:  # the config of the other overrides, with these values set as Hydra sets them (_value_overrides)
            from hydra._internal.config_loader_impl import ConfigLoaderImpl

            parsed, indices = values
            cfg = compose([o for i, o in enumerate(overrides) if i not in indices])
            if all(_is_leaf(cfg, o.key_or_group) for o in parsed):
                ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)
            else:
                values = None
        with_hydra_key = (key[0], True, os.getcwd(), *key[3:])
        if not values and not with_hydra and with_hydra_key in _COMPOSED:
            # the same composition with `hydra:` is kept: Hydra composes one config either way and then deletes that
            # node (hydra.compose), so its copy without the node is this config (an experiment's configs need both)
            from omegaconf import open_dict

            cfg = copy.deepcopy(_COMPOSED[with_hydra_key])
            with open_dict(cfg):
                del cfg["hydra"]
        elif not values:
            register()
            with initialize_config_module(config_module="ratebench.conf", version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
        if len(_COMPOSED) >= COMPOSED_KEPT:
            _COMPOSED.pop(next(iter(_COMPOSED)))
        _COMPOSED[key] = cfg
    return copy.deepcopy(_COMPOSED[key])


def _value_overrides(overrides, files: tuple) -> tuple[list, set[int]] | None:
    """The overrides that set a value (`key=value`, no group, package, sweep, + or ~), parsed, and their positions;
    None if there are none or some override does not parse. Hydra composes the defaults list from the other overrides
    and only then sets these on the result (ConfigLoaderImpl._apply_overrides_to_config, in their order), so compose
    can take the config of the other overrides (kept: a sweep's jobs, a test's runs differ in values) and set them
    with the same function: ~10 ms instead of Hydra's ~0.1 s. A key that names a config group (a folder of a conf
    folder's YAML files, a ConfigStore group, anything under hydra) stays with Hydra."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    if not overrides:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None  # Hydra's composition reports it
    from ratebench.core.registry import conf_folders

    groups = {name for name, node in ConfigStore.instance().repo.items() if isinstance(node, dict)}
    for folder in conf_folders():  # files: every YAML file of the conf folders (_compose_key)
        groups |= {Path(path).parent.relative_to(folder).as_posix() for path, _, _ in files
                   if Path(path).is_relative_to(folder)}
    picked = [(i, o) for i, o in enumerate(parsed)
              if o.type == OverrideType.CHANGE and o.package is None and not o.is_sweep_override()
              and not o.key_or_group.startswith("hydra") and "/" not in o.key_or_group
              and o.key_or_group not in groups and not isinstance(o.value(), dict)]
    return ([o for _, o in picked], {i for i, _ in picked}) if picked else None


def _is_leaf(cfg: DictConfig, key: str) -> bool:
    """Whether `key` (dotted) names a value or a list in cfg, not a config node nor a missing key."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False, throw_on_resolution_failure=False) \
        if parent_key else cfg
    return isinstance(parent, DictConfig) and name in parent and not isinstance(parent._get_node(name), DictConfig)


COMPOSED_KEPT = 256  # configs compose() keeps (the oldest goes first): ~135 KB each, so ~35 MB at most
_COMPOSED: dict[tuple, DictConfig] = {}


def _compose_key(overrides, with_hydra: bool) -> tuple:
    """Everything compose's result is a function of: the overrides; with `hydra:`, the working folder it records
    (hydra.runtime.cwd); the registered algorithms and environments (their config schemas and presets); and every
    YAML file Hydra may read, by path, size and modification time, in ratebench's conf folder and those of the
    plug-ins and $RATEBENCH_CONF_PATH. An edited preset, experiment or claim is composed again."""
    from ratebench.core.registry import conf_folders

    files = []
    for folder in conf_folders():  # ratebench's own conf/ first
        for path in sorted(Path(folder).rglob("*.yaml")):
            with contextlib.suppress(OSError):
                info = path.stat()
                files.append((str(path), info.st_size, info.st_mtime_ns))
    return tuple(overrides), with_hydra, os.getcwd() if with_hydra else None, _registered(), tuple(files)


def to_dataclass(node: Any, schema: type, where: str):
    """Typed copy of a config node (DictConfig or dict) as `schema`, errors naming the field.
    Interpolations (`algorithm.c_alpha_z='${algorithm.c_alpha}'`) are resolved first, against the whole
    config the node belongs to: merged into the bare schema they would have no root to resolve from."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(merged) if isinstance(merged, DictConfig) else merged


def resolve_seeds(cfg) -> list[int]:
    if cfg.n_seeds is not None:
        if cfg.n_seeds < 1:
            raise ConfigError("n_seeds", f"must be >= 1, got {cfg.n_seeds}")
        return list(range(cfg.n_seeds))
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise ConfigError("seeds", "must list at least one seed, got []")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ConfigError("seeds", f"must not repeat a seed; repeated: {dup}")
    if any(s < 0 for s in seeds):
        raise ConfigError("seeds", f"must be >= 0, got {seeds}")
    return seeds


@dataclass
class Validated:
    env: Any
    algorithm: Any
    model: ModelConfig
    seeds: list[int]
    impl: str = "fast"
    instances: list[int] | None = None  # a batched instance family (RunConfig.instances), or None
    health: HealthConfig = field(default_factory=HealthConfig)


def validate(cfg: DictConfig) -> Validated:
    """Every check that can be made without compute. Raises ConfigError naming the field."""
    env_name = cfg.env.get("name") if isinstance(cfg.env, DictConfig) else None
    if env_name not in ENVIRONMENTS:
        raise ConfigError("env", f"unknown environment {env_name!r}; allowed: {sorted(ENVIRONMENTS)}")
    algo_name = cfg.algorithm.get("name") if isinstance(cfg.algorithm, DictConfig) else None
    if algo_name not in ALGORITHMS:
        raise ConfigError("algorithm", f"unknown algorithm {algo_name!r}; allowed: {sorted(ALGORITHMS)}")
    for node, schema, where in ((cfg, RunConfig, ""), (cfg.budget, BudgetConfig, "budget"), (cfg.model, ModelConfig, "model"),
                                (cfg.health, HealthConfig, "health"),
                                (cfg.model.reward, NetConfig, "model.reward"), (cfg.model.policy, NetConfig, "model.policy"),
                                (cfg.env, ENVIRONMENTS[env_name][0], "env"), (cfg.algorithm, ALGORITHMS[algo_name].Config, "algorithm")):
        check_known_keys(node, schema, where)
    env = to_dataclass(cfg.env, ENVIRONMENTS[env_name][0], "env")
    ENVIRONMENTS[env_name][1](env)
    algorithm = to_dataclass(cfg.algorithm, ALGORITHMS[algo_name].Config, "algorithm")
    if hasattr(algorithm, "check"):  # algorithm-specific range checks, config only (no compute)
        algorithm.check()
    model = ModelConfig(reward=to_dataclass(cfg.model.reward, NetConfig, "model.reward"),
                        policy=to_dataclass(cfg.model.policy, NetConfig, "model.policy"))
    check_net(model.reward, "model.reward", ("mlp", "linear", "tabular"), may_bound=True)
    check_net(model.policy, "model.policy", ("mlp",))
    check_reward_bound(model.reward.bound, env, algo_name, model.reward.bound_reading)
    if cfg.budget.samples < 1:
        raise ConfigError("budget.samples", f"must be >= 1, got {cfg.budget.samples}")
    if cfg.budget.steps is not None and cfg.budget.steps < 1:
        raise ConfigError("budget.steps", f"must be >= 1 (or null: no step budget), got {cfg.budget.steps}")
    if getattr(algorithm, "oracle", "stochastic") == "exact" and cfg.budget.steps is None:
        raise ConfigError("budget.steps", "required with algorithm.oracle=exact: an exact-gradient run draws no "
                                          "samples, so budget.samples never stops it; set e.g. budget.steps=10000")
    if cfg.budget.evals_per_decade < 1:
        raise ConfigError("budget.evals_per_decade", f"must be >= 1, got {cfg.budget.evals_per_decade}")
    if cfg.threads < 1:
        raise ConfigError("threads", f"must be >= 1, got {cfg.threads}")
    if cfg.get("step_threads", 0) < 0:
        raise ConfigError("step_threads", f"must be >= 0 (0: every core), got {cfg.step_threads}")
    check_logger(str(cfg.get("logger", "none")))
    if not cfg.checkpoint_every_s >= 0:
        raise ConfigError("checkpoint_every_s", f"must be >= 0 seconds, got {cfg.checkpoint_every_s}")
    objective = cfg.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError("objective", f"must be null or one of {list(OBJECTIVES)}, got {objective!r}")
    check_free_keys(cfg)
    impl = cfg.get("impl", "fast")
    if impl not in IMPLS:
        raise ConfigError("impl", f"must be one of {list(IMPLS)}, got {impl!r}")
    why = ALGORITHMS[algo_name].impl_refusal(algorithm, impl)
    if why:
        raise ConfigError("impl", why)
    health = to_dataclass(cfg.health, HealthConfig, "health")
    check_health(health)
    instances = check_instances(cfg.get("instances"), ALGORITHMS[algo_name], algorithm)
    n_seeds, seeds_key = (cfg.n_seeds, "n_seeds") if cfg.n_seeds is not None else (len(cfg.seeds), "seeds")
    rows = max(int(n_seeds), 1) * (len(instances) if instances else 1)  # a batched family steps every instance's seeds
    check_bounds(cfg, env, model, rows, seeds_key, ALGORITHMS[algo_name])  # before the seed list is built
    return Validated(env=env, algorithm=algorithm, model=model, seeds=resolve_seeds(cfg), impl=impl, instances=instances,
                     health=health)


def check_reward_bound(bound, env, algo_name: str, reading: str = "tanh") -> None:
    """model.reward.bound (docs/bilevel.md "Bounded rewards"): only where model.reward is trained (every impl
    applies it, bilevel's compiled step included); a bandit's exact F* over the box enumerates 3^A faces per
    context."""
    if bound is None:
        return
    from ratebench.envs.global_ref import BOX_FACE_SIZE

    if not ALGORITHMS[algo_name].trains_model_reward:
        bounded = sorted(name for name, cls in ALGORITHMS.items() if cls.trains_model_reward)
        raise ConfigError("model.reward.bound", f"{algo_name} trains no model.reward; allowed: null, or a bound "
                                                f"with algorithm in {bounded}")
    if reading == "project" and not ALGORITHMS[algo_name].projects_model_reward:
        projected = sorted(name for name, cls in ALGORITHMS.items() if cls.projects_model_reward)
        raise ConfigError("model.reward.bound_reading", f"{algo_name} does not project its reward; allowed: tanh, or "
                                                        f"project with algorithm in {projected}")
    if env.name == "bandit" and env.n_actions > BOX_FACE_SIZE:
        raise ConfigError("model.reward.bound", f"the exact F* over the bounded class enumerates 3^A box faces per "
                                                f"context: allowed with env.n_actions <= {BOX_FACE_SIZE}, got {env.n_actions}")


def check_free_keys(cfg: DictConfig) -> None:
    """`free_keys`: a list of dotted keys of this config (`algorithm.lr`, `budget`), each naming a key that exists."""
    missing = object()
    for key in cfg.get("free_keys") or []:
        if not isinstance(key, str) or not key or OmegaConf.select(cfg, key, default=missing) is missing:
            raise ConfigError("free_keys", f"{key!r} is not a key of the run config; list dotted keys such as "
                                           f"budget.samples or algorithm.lr")


def check_instances(value, algorithm_class, algorithm) -> list[int] | None:
    """`instances`: null, or a non-empty list of distinct env.instance_seed values >= 0, for an algorithm
    whose step can batch instances."""
    if value is None:
        return None
    instances = [int(k) for k in value]
    if not instances or any(k < 0 for k in instances) or len(set(instances)) != len(instances):
        raise ConfigError("instances", f"must be null or a non-empty list of distinct env.instance_seed values >= 0 "
                                       f"(e.g. [1,2,3,4]), got {instances}")
    why = algorithm_class.instance_batch_refusal(algorithm)
    if why:
        raise ConfigError("instances", f"{why}; run one job per instance instead (ratebench run -m "
                                       f"env.instance_seed={','.join(map(str, instances))})")
    return instances


def check_known_keys(node, schema: type, where: str) -> None:
    """Refuse a key the schema does not declare (`+budget.sampels=1000` would otherwise run the
    default budget silently), naming it, the closest declared key and the allowed ones."""
    import difflib

    if not isinstance(node, DictConfig):
        return
    allowed = [f.name for f in fields(schema)] + (["hydra"] if schema is RunConfig else [])
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {'.'.join(filter(None, (where, close[0])))}? " if close else ""
            raise ConfigError(".".join(filter(None, (where, str(key)))),
                              f"unknown key; {hint}allowed: {', '.join(a for a in allowed if a != 'hydra')}")


def plain(cfg: Any) -> dict:
    """JSON-ready dict of a (structured or plain) config."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return {f.name: plain(getattr(cfg, f.name)) if hasattr(getattr(cfg, f.name), "__dataclass_fields__")
            else getattr(cfg, f.name) for f in fields(cfg)}


JOB_NAME_CHARS = 96  # the override part of a sweep job's folder name is cut here (file names stop at 255)


def job_name(overrides: str, env: str, algorithm: str, run_hash: str) -> str:
    """`<swept overrides>-<run_hash>` (`env.beta=0.5-1a2b...`), or `<env>-<algorithm>-<run_hash>` when
    nothing is swept: a folder a person can find by its values, keyed by the hash so that a re-run of
    the sweep finds its own folder (skip/resume) and the replace-guard compares whole configs."""
    text = "".join(ch if ch.isalnum() or ch in "._=,+-" else "_" for ch in overrides)[:JOB_NAME_CHARS]
    return f"{text}-{run_hash}" if text else f"{env}-{algorithm}-{run_hash}"


def job_overrides(task: list[str], shared: set[str]) -> str:
    """The overrides that name a sweep job: its task overrides without the keys every job of the sweep
    shares (`ratebench run -m` lists them in $RATEBENCH_SHARED_OVERRIDES), sorted, joined by ','."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task))
    return ",".join(sorted(ov.input_line for ov in parsed if ov.key_or_group not in shared))


def resolve(cfg, code, validated=None) -> tuple:
    """(validated config, resolved config dict, run_hash): the job's identity, a hash of the
    resolved config (seeds as a list, without the keys that cannot change a result) and of
    `code`, what identifies the code that computes it: the fingerprint (records.code_fingerprint), or a
    dict {"code": fingerprint, "plugins": {...}} (runner.resolve). validated: validate(cfg), if done."""
    v = validated if validated is not None else validate(cfg)
    resolved = plain(cfg)
    resolved["seeds"] = v.seeds
    resolved.pop("n_seeds", None)
    return v, resolved, config_hash({**identity(resolved), **(code if isinstance(code, dict) else {"code": code})})


def identity(resolved: dict) -> dict:
    return {k: val for k, val in resolved.items() if k not in OPERATIONAL_KEYS}


def job_id(*, _root_: DictConfig) -> str:
    """A sweep job's folder (job_name), keyed by its resolved config (the run_hash of run.json), not
    by its position in the sweep, so a re-run finds its own folder; named by the job's swept values."""
    import copy
    import os

    from omegaconf import open_dict, read_write

    task = OmegaConf.select(_root_, "hydra.overrides.task", default=None) or []
    shared = set(filter(None, os.environ.get("RATEBENCH_SHARED_OVERRIDES", "").split(",")))
    job = copy.deepcopy(_root_)
    with read_write(job), open_dict(job):
        job.pop("hydra", None)
    v, _, run_hash = resolve(job, code_fingerprint())
    return job_name(job_overrides(task, shared), v.env.name, v.algorithm.name, run_hash)


def describe_error(exc: BaseException) -> str:
    """One readable line from a Hydra/OmegaConf composition error, naming the field."""
    text = str(exc).strip()
    if "Could not find" in text and "Available options" in text:
        head = text.split("Could not find", 1)[1].split("\n", 1)[0].strip().strip("'")
        group, _, value = head.rpartition("/")
        options = []
        for line in text.split("Available options", 1)[1].splitlines()[1:]:
            if not line.startswith(("\t", " ")) or not line.strip():
                break
            options.append(line.strip())
        options = [o for o in options if not o.endswith("_schema")]
        return f"{group}: unknown value {value!r}; allowed: {', '.join(options)}"
    cause = exc.__cause__ or exc.__context__ or exc  # Hydra re-raises some OmegaConf errors without `from`
    key = getattr(cause, "full_key", None)
    msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    return f"{key}: {msg}" if key else f"{text.splitlines()[0]}: {msg}" if cause is not exc else text.splitlines()[0]
