"""The `predicted` curve of an exponent_curve claim: an arithmetic expression in `v` (the swept
parameter's value), parsed into a syntax tree and evaluated by walking it, never by eval. Allowed:
numbers, v, + - * / ** ( ), unary ±, and the functions min, max, log (natural), log10, exp, sqrt."""
from __future__ import annotations

import ast
import math
import operator

FUNCTIONS = {"min": min, "max": max, "log": math.log, "log10": math.log10, "exp": math.exp, "sqrt": math.sqrt}
ONE_ARG = ("log", "log10", "exp", "sqrt")
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_LENGTH = 200
ALLOWED = "numbers, v, + - * / ** ( ), min, max, log, log10, exp, sqrt"


class ExpressionError(ValueError):
    """The text is not an allowed expression, or it has no finite value at v."""


def parse_expression(text) -> ast.Expression:
    """The checked syntax tree of `text` (a str, or a number: a constant prediction); ExpressionError
    naming what is not allowed."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ExpressionError(f"must be an expression in v (text) or a number, got {text!r}")
    text = str(text)
    if not text.strip() or len(text) > MAX_LENGTH:
        raise ExpressionError(f"must be a non-empty expression of at most {MAX_LENGTH} characters, got {text!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"{text!r} is not an arithmetic expression ({exc.msg}); allowed: {ALLOWED}") from None
    for node in ast.walk(tree):
        _check(node, text)
    return tree


def _check(node, text: str) -> None:
    ok = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Load, *BINARY, *UNARY)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ExpressionError(f"{text!r}: {node.value!r} is not a number; allowed: {ALLOWED}")
    elif isinstance(node, ast.Name):
        if node.id != "v" and node.id not in FUNCTIONS:
            raise ExpressionError(f"{text!r}: unknown name {node.id!r}; allowed: {ALLOWED}")
    elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS or node.keywords:
            raise ExpressionError(f"{text!r}: only {', '.join(FUNCTIONS)} may be called, without keywords")
        if (name in ONE_ARG and len(node.args) != 1) or (name not in ONE_ARG and len(node.args) < 2):
            raise ExpressionError(f"{text!r}: {name} takes {'one argument' if name in ONE_ARG else 'two or more'}")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise ExpressionError(f"{text!r}: no starred arguments; allowed: {ALLOWED}")
    elif not isinstance(node, ok):
        raise ExpressionError(f"{text!r}: {type(node).__name__} is not allowed; allowed: {ALLOWED}")


def evaluate(tree: ast.Expression, v: float) -> float:
    """The expression's value at v (a float); ExpressionError when it has none (division by zero, log of
    a negative number, overflow, not finite)."""
    try:
        out = _eval(tree.body, float(v))
    except (ZeroDivisionError, ValueError, OverflowError, TypeError) as exc:
        raise ExpressionError(f"has no value at v = {v:g} ({exc})") from None
    if not (isinstance(out, float) and math.isfinite(out)):
        raise ExpressionError(f"has no finite real value at v = {v:g} (got {out!r})")
    return out


def _eval(node, v: float):
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id == "v":
            return v
        raise TypeError(f"{node.id} is a function: call it")
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_eval(node.operand, v))
    if isinstance(node, ast.BinOp):
        return BINARY[type(node.op)](_eval(node.left, v), _eval(node.right, v))
    if isinstance(node, ast.Call):
        return float(FUNCTIONS[node.func.id](*(_eval(a, v) for a in node.args)))
    raise TypeError(f"{type(node).__name__} is not allowed")


def predict(text, v: float) -> float:
    """The value of the expression `text` at v (parse_expression, then evaluate)."""
    return evaluate(parse_expression(text), v)
