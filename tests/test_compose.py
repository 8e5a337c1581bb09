"""compose() keeps what it composed (harness/config.py): the same overrides give an equal config without Hydra's
composition, a copy the caller may change, and anything the result depends on (a YAML file of a conf folder, the
working folder `hydra:` records, the overrides) is composed again."""
from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf, open_dict
from ratebench import config


@pytest.fixture
def hydra_calls(monkeypatch):
    """How many times compose() ran Hydra's composition, counted from now on an empty store."""
    import hydra

    calls, original = [], hydra.compose
    monkeypatch.setattr(config, "_COMPOSED", {})

    def counted(*args, **kwargs):
        calls.append(kwargs.get("overrides"))
        return original(*args, **kwargs)

    monkeypatch.setattr(hydra, "compose", counted)
    return calls


def test_the_same_overrides_give_an_equal_copy_without_composing_again(hydra_calls):
    first = config.compose(["env=mdp", "n_seeds=3"])
    with open_dict(first):
        first.n_seeds = 99  # a caller changing its config changes nobody else's
        del first["env"]
    second = config.compose(["env=mdp", "n_seeds=3"])
    assert len(hydra_calls) == 1
    assert second.n_seeds == 3 and second.env.name == "mdp"
    assert OmegaConf.is_struct(second)  # the copy keeps Hydra's flags: an unknown key is still an error
    with pytest.raises(Exception, match="no_such_key"):
        second.no_such_key = 1
    assert config.compose(["env=mdp", "n_seeds=4"]).n_seeds == 4 and len(hydra_calls) == 2  # other overrides
    assert config.compose(["n_seeds=3", "env=mdp"]) == config.compose(["env=mdp", "n_seeds=3"])


def test_an_edited_experiment_file_is_composed_again(hydra_calls, tmp_path, monkeypatch):
    """An experiment in a conf folder of $RATEBENCH_CONF_PATH (as `check` adds for a claim file given by path),
    edited between two composes: the second reads the edit."""
    from ratebench.core.registry import CONF_PATH_ENV

    folder = tmp_path / "conf"
    (folder / "experiment").mkdir(parents=True)
    experiment = folder / "experiment" / "compose_probe.yaml"
    experiment.write_text("# @package _global_\nn_seeds: 3\n")
    monkeypatch.setenv(CONF_PATH_ENV, str(folder))
    assert config.compose(["experiment=compose_probe"]).n_seeds == 3
    experiment.write_text("# @package _global_\nn_seeds: 5\n")
    os.utime(experiment, ns=(experiment.stat().st_atime_ns, experiment.stat().st_mtime_ns + 1_000_000))
    assert config.compose(["experiment=compose_probe"]).n_seeds == 5
    assert len(hydra_calls) == 2


def test_the_hydra_config_records_the_working_folder_it_was_composed_in(hydra_calls, tmp_path, monkeypatch):
    here = config.compose([], with_hydra=True)
    monkeypatch.chdir(tmp_path)
    there = config.compose([], with_hydra=True)
    assert there.hydra.runtime.cwd == str(tmp_path) != here.hydra.runtime.cwd
    assert len(hydra_calls) == 2
    assert "hydra" not in config.compose([])  # without `hydra:`, whatever the folder
