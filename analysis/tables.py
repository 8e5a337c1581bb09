"""Tables as text for other tools: Markdown pipe tables (report.md) and LaTeX tabulars (`fit --format
latex`), from a DataFrame of display strings. No optional dependency (tabulate, jinja2)."""
from __future__ import annotations

import math

import pandas as pd

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
