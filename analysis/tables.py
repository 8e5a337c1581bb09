"""Text for people and other tools: the fit table as shown (fit_display), Markdown pipe tables
(report.md) and LaTeX tabulars (`fit --format latex`) from a DataFrame of display strings, and the
progress lines of plot, check and report. No optional dependency (tabulate, jinja2)."""
from __future__ import annotations

import math
import os
import sys

import pandas as pd

from ratebench.analysis.labels import short_key

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"p̂": r"$\hat p$", "b̂": r"$\hat b$", "ĉ": r"$\hat c$", "ε": r"$\varepsilon$", "−": "-",
                 "≥": r"$\geq$", "≈": r"$\approx$", "≤": r"$\leq$", "·": r"$\cdot$", "∞": r"$\infty$"}


def cell_text(value, digits: int = 3) -> str:
    """A cell as text: floats to `digits` significant figures, NaN/None as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def estimate_digits(name: str | None, default: int = 3) -> int:
    """Significant figures to show a verdict's estimate with: a contraction factor ρ̂ near 1 is told apart in its
    later digits (6), an exponent is not (default)."""
    return 6 if name == "ρ̂" else default


def number_text(value, digits: int = 3, infinite: str = "-") -> str:
    """A number as text to `digits` significant figures; None/NaN as '-', +-inf as `infinite`
    (the one number format of fit tables, reports, verdict lines and legends)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return infinite if value > 0 else "-"
    return f"{value:.{digits}g}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown pipe table (| a | b |), pipes inside cells escaped."""
    def row(cells):
        return "| " + " | ".join(cell_text(c).replace("|", "\\|") for c in cells) + " |"
    lines = [row(frame.columns), "|" + "---|" * len(frame.columns)]
    lines += [row(r) for r in frame.itertuples(index=False)]
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    out = "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    for symbol, latex in LATEX_SYMBOLS.items():
        out = out.replace(symbol, latex)
    return out


def latex_table(frame: pd.DataFrame, caption: str = "") -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}), first column left-aligned, others right."""
    spec = "l" + "r" * (len(frame.columns) - 1)
    lines = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        lines.append(r"\caption{" + latex_escape(caption) + "}")
    lines += [r"\begin{tabular}{" + spec + "}", r"\toprule",
              " & ".join(latex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(cell_text(c)) for c in r) + r" \\" for r in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def fit_display(rows: list[dict]) -> pd.DataFrame:
    """The fit table as shown: one row per group, named by what differs between the groups
    (`group`), then the --by columns beyond algorithm/env/config_hash (`env.beta`), then the fit."""
    extra = [k for k in rows[0] if k.startswith("cfg.")] if rows else []
    return pd.DataFrame([{
        "group": r["label"], **{short_key(k): r[k] for k in extra},
        "p̂": number_text(r["p"]), "95% CI": f"[{number_text(r['p_low'])}, {number_text(r['p_high'])}]", "b̂": number_text(r["b"]),
        "b CI": f"[{number_text(r['b_low'])}, {number_text(r['b_high'])}]", "floor ĉ": number_text(r["c"]),
        "ε window": f"[{number_text(r['eps_low'])}, {number_text(r['eps_high'])}]", "levels": r["n_levels"],
        "seeds": r["n_seeds"], "diverged": r["n_diverged"], "failed": r["n_failed"],
        "status": r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"} for r in rows])


def fit_heading(rows: list[dict]) -> str:
    metric, x = rows[0]["metric"], rows[0]["x"]
    return f"metric {metric} vs {x}: p = exponent of n_hit(ε) ~ ε^-p; b = decay exponent of {metric} ≈ c + A·{x}^-b"


def progress(message: str) -> None:
    """One progress line on stderr (a figure, a claim); quiet under CI=true."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        print(message, file=sys.stderr, flush=True)
