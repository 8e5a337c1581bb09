"""`ratebench list [algorithms|envs|experiments|claims]`: what ships with the package and its plug-ins, one
line each, read from the conf folders (core/registry.py: preset comments, environment docstrings, claim
`source`), no imports of torch."""
from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path

import yaml

KINDS = ("algorithms", "envs", "experiments", "claims")


def conf_dir() -> Path:
    """The installed package's conf/ folder (ratebench.conf), wherever the command runs from."""
    spec = importlib.util.find_spec("ratebench.conf")
    return Path(spec.origin).parent


def one_line(text: str, width: int = 100) -> str:
    """text on one line, cut to width characters (with an ellipsis)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _comment_line(path: Path) -> str:
    """The leading comment paragraph of a YAML preset (`@package` directives left out), one line."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        if "@package" not in text:
            lines.append(text.lstrip("#").strip())
    return one_line(" ".join(lines))


def _docstring_line(module: str) -> str:
    """First line of a module's docstring, read from its source (no import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return one_line(doc.strip().splitlines()[0]) if doc.strip() else ""


def claim_files() -> list[Path]:
    """The claim files of every conf folder (the shipped ones, then the plug-ins'): what `check` reads by
    default and `list claims` shows."""
    from ratebench.core.registry import files

    return files("claims")


def entries(kind: str) -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped item of a kind (KINDS)."""
    from ratebench.core.registry import files

    if kind == "algorithms":
        out = []
        for p in files("algorithm"):
            name = (yaml.safe_load(p.read_text()) or {}).get("name", p.stem)
            text = _comment_line(p) or _docstring_line(f"ratebench.algorithms.{name}")
            out.append((p.stem, text))
        return out
    if kind == "envs":
        return [(p.stem, _comment_line(p) or _docstring_line(f"ratebench.envs.{p.stem}")) for p in files("env")]
    if kind == "experiments":
        return [(p.stem, _comment_line(p)) for p in files("experiment")]
    if kind == "claims":
        out = []
        for p in claim_files():
            data = yaml.safe_load(p.read_text()) or {}
            form = data.get("form") or "polynomial"
            out.append((p.stem, one_line(f"[id {data.get('id', '?')}, {form}] {data.get('source', '')}", 120)))
        return out
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def format_entries(kinds) -> str:
    lines = []
    for kind in kinds:
        items = entries(kind)
        width = max(len(n) for n, _ in items) if items else 0
        option = {"algorithms": "algorithm=", "envs": "env=", "experiments": "experiment=", "claims": "check "}[kind]
        lines.append(f"{kind} ({option}<name>):")
        lines += [f"  {name:<{width}}  {text}" for name, text in items]
        lines.append("")
    return "\n".join(lines).rstrip()


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print("usage: ratebench list [algorithms|envs|experiments|claims]\n\nWhat ships with ratebench, one line "
              "each: algorithm=, env= and experiment= presets, and the claims `ratebench check <name>` judges.")
        return 0
    bad = [a for a in args if a not in KINDS]
    if bad:
        print(f"ratebench list: error: unknown kind {bad[0]!r}; allowed: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    print(format_entries(args or KINDS))
    return 0


RUN_KEYS = (  # (override, what it does): the keys every run accepts (README), shown by `ratebench run --help`
    ("seeds=[0,1,2]  |  n_seeds=N", "algorithm seeds, advanced together in one process as a batch"),
    ("env.instance_seed=K", "draws the environment instance (features, teacher, pi_ref), apart from the seeds"),
    ("instances=[1,2,3,4]", "those env.instance_seed values as ONE batched job: <run dir>/instance_<k>/ each"),
    ("env.beta=B", "KL weight (> 0)"),
    ("budget.samples=N", "stop when the sample counter reaches N (default 20000)"),
    ("budget.steps=N", "also stop after N outer steps; evaluation points log-spaced in steps"),
    ("model.reward.width=W  model.policy.width=W", "network widths (also .depth, .kind, .activation)"),
    ("hydra.run.dir=DIR  |  hydra.sweep.dir=DIR", "output folder of a run / of a sweep (-m)"),
    ("health.stall_rtol=R  health.min_log_prob=L", "when a seed is `saturated` / `stalled`, not completed: docs/metrics.md"),
    ("objective=policy_gap", "what a job returns to a tuning sweeper (mean final value over seeds): docs/sweeps.md"),
)
RUN_EXAMPLES = (
    "ratebench run algorithm=bilevel                             # the paper's method, 8 seeds, ~10 s",
    "ratebench run env=mdp algorithm=dpo algorithm.mode=online n_seeds=16",
    "ratebench run -m env.beta=0.5,1.0,2.0 hydra.sweep.dir=runs/beta   # a sweep: one folder per value",
    "ratebench run experiment=control_bandit hydra.sweep.dir=runs/control",
    "ratebench run --cfg job                                     # print the resolved config, run nothing",
)


def run_help() -> str:
    """The text of `ratebench run --help` (Hydra's app help template, conf/config.yaml): the config
    groups with their choices, the common keys, examples; then Hydra's flags ($FLAGS_HELP)."""
    groups = [("algorithm=", "algorithms"), ("env=", "envs"), ("experiment=", "experiments")]
    lines = ["ratebench run: one job, or a sweep with -m, of an RLHF algorithm on a problem whose optimum is known",
             "exactly; writes metrics.parquet and run.json into its output folder.", "",
             "usage: ratebench run [-m] [key=value ...]", "", "Config groups (`ratebench list` describes each):"]
    for option, kind in groups:
        names = textwrap.wrap(", ".join(name for name, _ in entries(kind)), 86)
        lines += [f"  {option if i == 0 else '':<12} {text}" for i, text in enumerate(names)]
    lines += ["", "Keys every run accepts:"]
    lines += [f"  {key:<44} {text}" for key, text in RUN_KEYS]
    lines += ["", "Examples:"] + [f"  {e}" for e in RUN_EXAMPLES]
    completion = 'Shell completion: eval "$(ratebench -sc install=bash)"   (zsh: after `autoload bashcompinit; bashcompinit`)'
    lines += ["", completion, "", "Hydra's flags:", "FLAGS_HELP_HERE"]
    return "\n".join(lines).replace("$", "$$").replace("FLAGS_HELP_HERE", "$FLAGS_HELP")
