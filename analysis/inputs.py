"""Bad input to the analysis, refused alike by the Python API (ratebench.analysis) and the commands
(commands.py): BadInput (one line naming the option; the commands exit 2), the fit options' bounds,
the metric, x axis and grouping columns a set of runs offers, a folder of runs, claims by name."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ratebench.analysis.claims import Claim, find_claim, load_claim
from ratebench.analysis.curves import METRICS, X_AXES
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.load import Loaded, load
from ratebench.core.catalog import claim_files, conf_dir
from ratebench.core.registry import add_conf_folder, claim_conf_folder, conf_folders

CONF_DIR = conf_dir()  # the installed package's conf/ (one home: ratebench.core.catalog)
MAX_N_BOOT = 100_000  # bootstrap replicates: 2000 (default) gives stable 95% bounds; 1e8 would exhaust memory


class BadInput(Exception):
    """One message for stderr; the command exits 2."""


def check_fit_options(opts: FitOptions) -> FitOptions:
    """The bounds of the fit options, for the CLI's flags and the Python API's keywords alike."""
    if not 100 <= opts.n_boot <= MAX_N_BOOT:
        raise BadInput(f"--n-boot must be in [100, {MAX_N_BOOT}] (memory and time grow with replicates x seeds x "
                       f"ε levels per group), got {opts.n_boot}")
    if opts.seed < 0:
        raise BadInput(f"--boot-seed must be >= 0, got {opts.seed}")
    if not 0.5 <= opts.reach <= 1:
        raise BadInput(f"--reach must be in [0.5, 1], got {opts.reach}")
    for name in ("decades", "tail", "floor_factor", "nhit_decades", "min_decades"):
        if not getattr(opts, name) >= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(opts, name)}")
    return opts


def load_dir(path, strict: bool) -> Loaded:
    """Every run under path; bad input (missing folder, no runs) → BadInput."""
    root = Path(path)
    if not root.exists():
        raise BadInput(f"{root}: no such folder")
    if not root.is_dir():
        raise BadInput(f"{root}: not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(root, strict=strict)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if loaded.seeds.empty:
        skipped = f" ({len(loaded.skipped)} unreadable)" if loaded.skipped else ""
        raise BadInput(f"{root}: no runs found (no readable run.json below it{skipped}); "
                       "make some with `ratebench run ... hydra.run.dir=...`")
    return loaded


def check_metric(loaded: Loaded, metric: str, x_name: str) -> None:
    available = [m for m in METRICS if m in loaded.metrics.columns]
    if metric not in available:
        raise BadInput(f"--metric: unknown metric {metric!r}; allowed: {', '.join(available)}")
    if x_name not in loaded.metrics.columns:
        raise BadInput(f"--x: column {x_name!r} is not in the run records; allowed: "
                       f"{', '.join(x for x in X_AXES if x in loaded.metrics.columns)}")


def check_by(loaded: Loaded, by: list[str]) -> None:
    bad = [k for k in by if k not in loaded.seeds.columns]
    if bad:
        allowed = ["algorithm", "env", "experiment", "config_hash"] + [c for c in loaded.seeds.columns
                                                                         if c.startswith("cfg.")]
        raise BadInput(f"--by: unknown column(s) {bad}; allowed: {', '.join(allowed)}")


def default_claims() -> list[Path]:
    return claim_files()


def claim_folders() -> list[Path]:
    """Every conf folder's claims/ (ratebench's, the plug-ins', a claim file's own), in search order."""
    return [folder / "claims" for folder in conf_folders()]


def named_claims(names: list[str]) -> list[Claim]:
    """Claims from names, ids or paths (claims.find_claim over every conf folder), all parsed before any
    compute: for check, plot and report alike. A claim file given by path adds its conf folder
    (claim_conf_folder) to the search path of this process and of the runs it starts, so its experiment
    is found and run like a shipped one."""
    claims = []
    for name in names:
        path = find_claim(name, claim_folders())
        if path.is_file() and path.absolute().parent not in [f.absolute() for f in claim_folders()]:
            add_conf_folder(claim_conf_folder(path))
        claims.append(load_claim(path))
    return claims


