"""Groups named by what differs (issue 15, item 1): the pure labelling function over the groups'
resolved configs, and the sweep job folder name built from the swept overrides plus the run_hash."""
from __future__ import annotations

import pandas as pd
from ratebench.analysis.labels import MIXED, differing_keys, group_config, group_labels
from ratebench.config import job_name


def test_label_names_only_the_swept_value():
    configs = [{"algorithm": "bilevel", "env": "bandit", "env.beta": b, "budget.samples": "2000"}
               for b in ("0.5", "1", "2")]
    assert group_labels(configs) == ["env.beta=0.5", "env.beta=1", "env.beta=2"]


def test_algorithm_knobs_are_compared_within_the_same_algorithm():
    configs = [{"algorithm": "dpo", "algorithm.mode": "offline", "algorithm.beta_dpo": "0.1"},
               {"algorithm": "dpo", "algorithm.mode": "online", "algorithm.beta_dpo": "0.1"},
               {"algorithm": "ppo_rlhf", "algorithm.mode": "offline", "algorithm.clip": "0.2"}]
    assert group_labels(configs) == ["algorithm=dpo algorithm.mode=offline", "algorithm=dpo algorithm.mode=online",
                                     "algorithm=ppo_rlhf"]


def test_hash_only_breaks_ties_and_a_single_group_names_algorithm_and_env():
    same = [{"algorithm": "a", "env": "bandit"}, {"algorithm": "a", "env": "bandit"}]
    assert group_labels(same, ["1234567890", "abcdef0123"]) == ["algorithm=a env=bandit [123456]",
                                                                "algorithm=a env=bandit [abcdef]"]
    assert group_labels([{"algorithm": "a", "env": "bandit", "env.beta": "1"}]) == ["algorithm=a env=bandit"]


def test_pooled_group_is_not_named_by_a_key_that_varies_inside_it():
    seeds = pd.DataFrame({"cfg.algorithm.name": ["x", "x"], "cfg.env.beta": [0.5, 1.0], "cfg.env.name": ["m", "m"],
                          "other": [1, 2]})
    config = group_config(seeds)
    assert config == {"algorithm": "x", "env.beta": MIXED, "env": "m"}
    assert differing_keys([config, {"algorithm": "y", "env.beta": MIXED, "env": "m"}]) == [["algorithm"], ["algorithm"]]


def test_job_folder_is_the_swept_overrides_plus_the_run_hash():
    assert job_name("env.beta=0.5", "bandit", "dpo", "0123456789abcdef") == "env.beta=0.5-0123456789abcdef"
    assert job_name("", "bandit", "dpo", "0123456789abcdef") == "bandit-dpo-0123456789abcdef"
    assert job_name("x=a/b", "e", "a", "h") == "x=a_b-h"  # never a path separator
    assert len(job_name("k=" + "v" * 500, "e", "a", "h" * 16)) < 255


def test_operational_keys_do_not_name_groups_but_impl_does():
    """logger / progress cannot change a result (records.OPERATIONAL_KEYS): not in a label; impl can (docs/fast.md)."""
    rows = pd.DataFrame({"cfg.env.beta": ["0.5", "1.0"], "cfg.logger": ["none", "tensorboard"],
                         "cfg.progress": [True, False], "cfg.impl": ["fast", "reference"]})
    configs = [group_config(rows.iloc[[i]]) for i in range(2)]
    assert group_labels(configs) == ["env.beta=0.5 impl=fast", "env.beta=1.0 impl=reference"]
