"""Property-based fuzz (issue 14): any override list either passes the pre-run validation or is
refused with exit 2 and one line; any claim file either loads or is refused with one line. Validate
only (no run), derandomized (reproducible), bounded examples: a few seconds."""
from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

from ratebench.analysis.claims import REQUIRED, load_claim
from ratebench.cli import _BadInput, _prevalidate, main
from ratebench.core.errors import ConfigError

KEYS = ["env", "algorithm", "env.beta", "env.n_actions", "env.n_contexts", "env.label_noise", "env.instance_seed",
        "env.max_pairs", "env.teacher", "budget.samples", "budget.steps", "budget.evals_per_decade", "n_seeds",
        "seeds", "threads", "checkpoint_every_s", "model.policy.width", "model.reward.kind", "model.reward.depth",
        "algorithm.batch_pairs", "algorithm.lr_exponent", "cache_dir", "overwrite", "experiment",
        "budget.sampels", "foo", "env.bta", "model", "budget"]
NUMBERS = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["0", "1", "-1", "2", "1e9", "1e400", "inf", "-inf", "nan", "0.5"]))
WORDS = st.one_of(st.sampled_from(["bandit", "mdp", "token", "bilevel", "dpo", "reward_mle", "null", "true",
                                   "[0,1]", "[1,1]", "[]", "{a: 1}", "linear", "mlp", "''", "rate_bandit"]),
                  st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8))
VALUES = st.one_of(NUMBERS.map(str), WORDS)
OVERRIDE = st.builds(lambda prefix, key, value: f"{prefix}{key}={value}",
                     st.sampled_from(["", "", "", "+", "++", "~"]), st.sampled_from(KEYS), VALUES)
NO_SHRINK = (Phase.explicit, Phase.generate)  # a failure is reported as found (derandomized: reproducible), fast
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, database=None, phases=NO_SHRINK,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip()


@FUZZ
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
@example(["env=0"])  # what the fuzz found: tracebacks from Hydra's own checks, and a multi-line parse error
@example(["experiment=[1,1]"])
@example(["env=#"])
def test_any_overrides_validate_or_are_refused_in_one_line(monkeypatch, capsys, tmp_path, overrides):
    """Through the command itself (`ratebench run <overrides>`), with the Hydra job replaced by a stub that
    only records that it was reached: either the job starts (exit 0) or the command refuses with exit 2 and
    one line, before the job; never 1 (a verdict's status) or 3 (our bug)."""
    import ratebench.app

    started = []
    monkeypatch.setattr(ratebench.app, "hydra_entry", lambda: started.append(True))
    capsys.readouterr()
    code = main(["run", *overrides, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    if code == 2:
        assert not started and one_line(err) and err.startswith("ratebench: error:"), (overrides, err)
    else:
        assert code == 0 and started, (overrides, code, err)
    try:  # the same decision as the pre-run validation alone
        _prevalidate(overrides, multirun=False)
    except _BadInput as exc:
        assert code == 2 and one_line(str(exc)), (overrides, str(exc))
    else:
        assert code == 0, (overrides, err)


CLAIM_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=12), st.lists(st.integers(-3, 5), max_size=3),
                         st.dictionaries(st.sampled_from(["unit", "min", "max", "x"]),
                                         st.one_of(st.floats(allow_nan=True), st.text(max_size=6),
                                                   st.sampled_from(["gap", "grad_sq", "reward_err"])), max_size=4),
                         st.sampled_from(["gap", "grad_sq", "reward_err", "samples", "queries", "upper_bound",
                                          "equals", "reward_mle", "control_bandit", "../../x", "ok_id"]))
CLAIM = st.dictionaries(st.sampled_from([*REQUIRED, "tolerance", "min_seeds", "instances", "extra"]), CLAIM_VALUES)
RAW = st.one_of(CLAIM.map(lambda d: yaml.safe_dump(d).encode()), CLAIM.map(lambda d: json.dumps(d).encode()),
                st.binary(max_size=40), st.text(max_size=40).map(str.encode))


@settings(max_examples=150, deadline=None, derandomize=True, database=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(RAW)
def test_any_claim_file_loads_or_is_refused_in_one_line(tmp_path, raw):
    path = tmp_path / "claim.yaml"
    path.write_bytes(raw)
    try:
        load_claim(path)
    except ConfigError as exc:
        assert one_line(str(exc)), (raw, str(exc))


def test_check_refuses_a_fuzzed_claim_file_with_exit_2(tmp_path, capsys):
    """The same through the command: exit 2, one line on stderr (not a traceback, not check's 1)."""
    path = tmp_path / "claim.yaml"
    path.write_bytes(b"id: [1, 2\nexponent: {")
    assert main(["check", str(path), "--runs", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err)
