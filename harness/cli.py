"""`ratebench` command line: run (a Hydra app), fit, plot, check, report, audit."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

USAGE = """usage: ratebench <command> [args]

  run [hydra overrides]    run a job (add -m for a sweep), e.g. ratebench run env=mdp seeds=[0,1,2]
  fit DIR                  fit sample-complexity exponents of the runs under DIR
  plot DIR                 convergence and n_hit(eps) figures of the runs under DIR
  check [CLAIMS] [--runs DIR]  verdict per claim (exit 0 all pass, 1 violated/inconclusive, 2 bad input)
  report DIR               HTML + Markdown report of the runs under DIR
  audit [env overrides] [--starts N] [--runs DIR] [--json] [--out DIR]
                           the instance's landscape of F and the claim's premises (WGD floor, implied exponent)
  compare DIR --metric M --by algorithm
                           difference of exponents between groups, paired bootstrap CI
  list [algorithms|envs|experiments|claims]
                           what ships (and the installed plug-ins), one line each
  init DIR                 a new repository: an algorithm plug-in, an experiment, a claim, a test, a CI workflow
  --version                the installed version

Run `ratebench run --help` for the run keys and examples, `ratebench run --cfg job` to see the config.
Shell completion (bash, zsh with bashcompinit): eval "$(ratebench -sc install=bash)".
Exit status: 0 done (check: every claim passes), 1 check only: a claim violated or inconclusive,
2 bad input (one line naming the field), 3 internal error (one line + the file holding the traceback),
130 / 143 interrupted by SIGINT / SIGTERM (a run checkpoints first: re-run to resume)."""

HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--version",
                    "--shell-completion", "-sc"}
MAX_VALIDATED_COMBINATIONS = 64


def _fail(message: str) -> int:
    print(f"ratebench: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """The exit status of a command (see USAGE); nothing but check's verdicts returns 1, and no
    exception leaves as a bare traceback."""
    from ratebench.exits import internal_error
    from ratebench.core.errors import ConfigError
    from ratebench.signals import Interrupted

    try:
        return _main(argv)
    except Interrupted as exc:
        return exc.code
    except ConfigError as exc:  # bad input found outside a command's own checks (e.g. a plug-in that fails to load)
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("ratebench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (our bug, not the user's input)
        return internal_error(exc)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("--version", "-V", "version"):
        from ratebench import __version__

        print(f"ratebench {__version__}")
        return 0
    if command in COMPLETION_FLAGS:
        return completion_command(argv)
    if command == "list":
        from ratebench.core import catalog

        return catalog.main(rest)
    if command == "init":
        from ratebench import scaffold

        return scaffold.main(rest)
    if command == "run":
        code = run_command(rest)
    elif command in ("fit", "plot", "check", "report", "compare"):
        try:
            from ratebench.analysis import commands
        except ImportError:
            return _fail(f"'ratebench {command}' is not built yet")
        from ratebench.audit import premise_summary

        code = commands.main(command, rest, premise=premise_summary)
    elif command == "audit":
        from ratebench import audit

        code = audit.main(rest)
    else:
        return _fail(f"unknown command {command!r}; allowed: run, fit, plot, check, report, audit, compare, list, "
                     "init, --version")
    return code


def _split(args: list[str]) -> tuple[list[str], list[str], bool]:
    flags, overrides, multirun = [], [], False
    for a in args:
        if a in ("-m", "--multirun"):
            multirun = True
            flags.append(a)
        elif a.startswith("-"):
            flags.append(a)
        else:
            overrides.append(a)
    return flags, overrides, multirun


COMPLETION_FLAGS = ("-sc", "--shell-completion")
COMMANDS = ("run", "fit", "plot", "check", "report", "audit", "compare", "list", "init", "--version")


def completion_command(args: list[str]) -> int:
    """Hydra's shell completion for `ratebench run`: `-sc install=bash` prints the script (registered
    for `ratebench`), `-sc query=bash` answers the script's query. The script asks `ratebench -sc
    query=bash` with the whole line in COMP_LINE: the word `run` is taken out before Hydra reads it
    (it would complete `run` as an override), and the first word completes to the commands."""
    from ratebench.config import register

    register()
    line = os.environ.get("COMP_LINE")
    query = any(a.startswith("query=") for a in args)
    if query and line is not None:
        words = line.split()
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
            return 0
        if words[1] != "run":
            return 0  # fit/plot/check/... take folders and files: the shell's own completion
        os.environ["COMP_LINE"] = line.replace("run", "", 1)
    import contextlib
    import io

    from ratebench.app import hydra_entry

    sys.argv = ["ratebench", *[a for a in args if a != "run"]]
    answer, code = io.StringIO(), 0
    with contextlib.redirect_stdout(answer):
        try:
            hydra_entry()
        except SystemExit as exc:
            code = int(exc.code or 0)
    text = answer.getvalue()
    if query:  # the structured-config schemas are not choices a user makes
        text = " ".join(w for w in text.split() if not w.split("=", 1)[-1].endswith("_schema")) + "\n"
    sys.stdout.write(text)
    return code


def run_command(args: list[str]) -> int:
    from ratebench.config import register

    register()
    if set(args) & set(COMPLETION_FLAGS):
        return completion_command(args)
    flags, overrides, multirun = _split(args)
    if not (set(flags) & HYDRA_INFO_FLAGS):
        try:
            multirun = _prevalidate(overrides, multirun)  # also an experiment file's hydra.mode: MULTIRUN
        except _BadInput as exc:
            return _fail(str(exc))
    from ratebench.app import hydra_entry

    sweep = multirun and not (set(flags) & HYDRA_INFO_FLAGS)
    if sweep:
        _name_jobs_by_swept_values(overrides)
        _start_sweep_log()
    sys.argv = ["ratebench run", *args]
    from ratebench.signals import LAUNCHER_ENV

    os.environ[LAUNCHER_ENV] = str(os.getpid())  # a sweep worker whose parent this is stops when it dies
    sweep_code = 0
    try:
        hydra_entry()
    except SystemExit as exc:  # the job's status (app.py); Hydra's own failures exit 1: not check's 1
        if set(flags) & HYDRA_INFO_FLAGS:  # --help, --cfg, ...: Hydra's own exit, as it was
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 3)
        if code == 1:
            print("ratebench: internal error: Hydra stopped with exit status 1 (its message is above)", file=sys.stderr)
            return 3
        return code
    finally:
        os.environ.pop(SHARED_OVERRIDES_ENV, None)
        os.environ.pop(LAUNCHER_ENV, None)
        if sweep:
            sweep_code = _print_sweep_summary()
    return sweep_code  # a sweep whose jobs all ran: the highest status of its failed jobs, else 0


SHARED_OVERRIDES_ENV = "RATEBENCH_SHARED_OVERRIDES"  # read by config.job_id (sweep job folder names)


SWEEP_LOG_PREFIX = "ratebench-sweep-"  # + the launcher's pid + "-": the logs in the system's temporary folder


def _start_sweep_log() -> None:
    """A fresh file that every job of this sweep appends its outcome to (app.report_outcome), named by this
    process's pid. The logs of launchers that no longer run are removed first: a sweep killed by SIGKILL or
    SIGTERM never reaches the `finally` that removes its own."""
    import tempfile

    from ratebench.app import SWEEP_LOG_ENV

    for old in Path(tempfile.gettempdir()).glob(f"{SWEEP_LOG_PREFIX}*-*.jsonl"):
        pid = old.name[len(SWEEP_LOG_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            old.unlink(missing_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{SWEEP_LOG_PREFIX}{os.getpid()}-", suffix=".jsonl")
    os.close(fd)
    os.environ[SWEEP_LOG_ENV] = path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _print_sweep_summary() -> int:
    """Print `ratebench: sweep of 4 jobs: 2 done, 1 skipped, 1 resumed, 0 failed` from the jobs'
    outcomes; return the sweep's exit status (the highest of its failed jobs', else 0)."""
    from ratebench.app import SWEEP_LOG_ENV, sweep_summary

    path = os.environ.pop(SWEEP_LOG_ENV, None)
    if not path:
        return 0
    try:
        line, code = sweep_summary(Path(path).read_text())
        print(line, flush=True)
        return code
    finally:
        Path(path).unlink(missing_ok=True)


def _name_jobs_by_swept_values(overrides: list[str]) -> None:
    """Tell config.job_id which overrides every job of this sweep shares, so that each job's folder is
    named by the swept values only (`env.beta=0.5-<run_hash>`). An environment variable, inherited by
    launcher workers, rather than a Hydra override: nothing changes in the jobs' configs or argv."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    shared = sorted({ov.key_or_group for ov in parsed if not ov.is_sweep_override()})
    os.environ[SHARED_OVERRIDES_ENV] = ",".join(shared)


class _BadInput(Exception):
    pass


def _expand(overrides: list[str]) -> list[list[str]]:
    """Every job's override list for a sweep (capped: beyond the cap, each value alone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed, sweeps = [], []
    for text, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            values = list(ov.sweep_string_iterator())
            sweeps.append([f"{ov.get_key_element()}={v}" for v in values])
        else:
            fixed.append(text)
    if not sweeps:
        return [fixed]
    total = 1
    for s in sweeps:
        total *= len(s)
    if total <= MAX_VALIDATED_COMBINATIONS:
        return [fixed + list(c) for c in itertools.product(*sweeps)]
    return [fixed + [v] for s in sweeps for v in s]


def _prevalidate(overrides: list[str], multirun: bool) -> bool:
    """Compose and validate every job's config, and check the output folder, before Hydra
    creates anything: bad input exits 2 with nothing written. Returns whether this is a sweep: -m,
    or `hydra.mode: MULTIRUN` in the composed config (the rate_* and smoke experiments set it), whose
    jobs are then named, validated and summarised like those of `run -m`."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from ratebench.config import describe_error, validate
    from ratebench.core.errors import ConfigError

    try:
        jobs = _expand(overrides)
    except HydraException as exc:
        raise _BadInput(f"cannot parse overrides: {str(exc).strip().splitlines()[0]}") from None
    first = _compose_or_bad(jobs[0])
    preset = str(OmegaConf.select(first, "hydra.mode")).endswith("MULTIRUN")
    multirun = multirun or preset
    if not multirun and len(jobs) > 1:
        raise _BadInput("a sweep (comma list, range, glob) needs -m: ratebench run -m " + " ".join(overrides))
    dir_key = "sweep.dir" if multirun else "run.dir"
    for i, job in enumerate(jobs):
        cfg = first if i == 0 else _compose_or_bad(job)
        try:
            out = OmegaConf.select(cfg.hydra, dir_key)
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)
            if not multirun and out:  # sweep job folders are named by run_hash: they cannot clash
                from ratebench.runner import refuse_replacing_job

                refuse_replacing_job(cfg, Path(out))
        except ConfigError as exc:
            raise _BadInput(str(exc)) from None
        except (HydraException, OmegaConfBaseException) as exc:
            raise _BadInput(describe_error(exc)) from None
        _check_writable(out, f"hydra.{dir_key}")
        _check_cache(cfg.get("cache_dir"))
    given = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    if multirun and "hydra.run.dir" in given and "hydra.sweep.dir" not in given:  # a sweep ignores hydra.run.dir
        why = "its experiment sets hydra.mode: MULTIRUN" if preset else "-m"
        raise _BadInput(f"hydra.run.dir: this is a sweep ({why}), whose jobs go one folder each under hydra.sweep.dir "
                        "(default multirun/): give hydra.sweep.dir=DIR instead")
    return multirun


def _compose_or_bad(job: list[str]):
    """_compose, with Hydra's and OmegaConf's composition errors as one-line bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ratebench.config import describe_error
    from ratebench.core.errors import ConfigError

    try:
        return _compose(job)
    except ConfigError as exc:
        raise _BadInput(str(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise _BadInput(describe_error(exc)) from None


def _compose(job: list[str]):
    """The job's config with `hydra:`; Hydra's own value checks (ValueError / TypeError, e.g. `env=0` or
    `experiment=[1,1]`: a config group takes names) are bad input, not a traceback."""
    from ratebench.config import compose
    from ratebench.core.errors import ConfigError

    try:
        return compose(job, with_hydra=True)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise _BadInput(f"{' '.join(job)}: {str(exc).strip().splitlines()[0]} (a config group such as env, "
                        f"algorithm or experiment takes a name or a list of names)") from None


def _check_cache(explicit: str | None) -> None:
    """The F* cache (cache_dir, else $RATEBENCH_CACHE, else ~/.cache/ratebench) must be a readable,
    writable folder or creatable: found now, not after Hydra has made the output folder."""
    from ratebench.core.cache import cache_dir

    where = "cache_dir" if explicit else "RATEBENCH_CACHE" if os.environ.get("RATEBENCH_CACHE") else "cache_dir"
    folder = cache_dir(explicit).absolute()
    if folder.exists():
        if not folder.is_dir():
            raise _BadInput(f"{where}: the F* cache {str(folder)!r} is not a folder")
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            raise _BadInput(f"{where}: the F* cache folder {str(folder)!r} is not readable and writable")
        return
    _check_writable(str(folder), where, "the F* cache folder")


def _check_writable(path: str | None, field: str, what: str = "output folder") -> None:
    from ratebench.core.records import unwritable_reason

    why = unwritable_reason(path) if path else None
    if why:
        raise _BadInput(f"{field}: cannot write the {what} {str(Path(path).absolute())!r}: {why}")
