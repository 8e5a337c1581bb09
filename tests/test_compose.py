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
    # other values on the same groups: set on the config Hydra composed for env=mdp, without composing again
    assert config.compose(["env=mdp", "n_seeds=4"]).n_seeds == 4 and hydra_calls == [["env=mdp"]]
    assert config.compose(["env=token", "n_seeds=4"]).env.name == "token" and len(hydra_calls) == 2  # another group
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


def test_conf_folders_name_each_real_folder_once_and_follow_the_variable(tmp_path, monkeypatch):
    """$RATEBENCH_CONF_PATH's folders after the plug-ins', each real folder once (a symlink to one already listed, a
    relative name of it, ratebench's own conf/ named again are dropped), and a changed variable or working folder is
    read again (conf_folders keeps its answer per variable and folder)."""
    from ratebench.core.registry import CONF_PATH_ENV, conf_folders, search_path

    monkeypatch.delenv(CONF_PATH_ENV, raising=False)
    own = conf_folders()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (tmp_path / "link").symlink_to(a)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONF_PATH_ENV, os.pathsep.join([str(a), str(tmp_path / "link"), "b", str(own[0]), " ", "a"]))
    assert conf_folders() == [*own, a, tmp_path / "b"]
    assert search_path() == [f"file://{f}" for f in [*own[1:], a, tmp_path / "b"]]
    monkeypatch.setenv(CONF_PATH_ENV, "b")
    assert conf_folders() == [*own, tmp_path / "b"]
    monkeypatch.chdir(a)
    assert conf_folders() == [*own, a / "b"]  # a relative name is read against the working folder
    monkeypatch.delenv(CONF_PATH_ENV)
    assert conf_folders() == own


def test_register_stores_again_only_what_changed(monkeypatch):
    """register() stores the schemas once per registries, conf folders and store; a cleared store gets them again
    and composes (it did not trust its memo)."""
    from hydra.core.config_store import ConfigStore

    stored = []
    original = ConfigStore.store
    monkeypatch.setattr(ConfigStore, "store", lambda self, *a, **k: (stored.append(k.get("name")), original(self, *a, **k)))
    monkeypatch.setattr(config, "_REGISTERED", {})
    config.register()
    assert "run_schema" in stored
    stored.clear()
    config.register()
    assert stored == []
    monkeypatch.delitem(ConfigStore.instance().repo, "run_schema.yaml")  # put back after the test
    config.register()
    assert "run_schema" in stored
    monkeypatch.setattr(config, "_COMPOSED", {})
    assert config.compose(["n_seeds=2"]).n_seeds == 2


def _hydra_itself(overrides):
    """Hydra's composition of `overrides`, called here directly (no compose() memo, no value shortcut)."""
    from hydra import compose as hydra_compose, initialize_config_module

    config.register()
    with initialize_config_module(config_module="ratebench.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def _outcome(compose_fn, overrides):
    try:
        cfg = compose_fn(overrides)
    except Exception as exc:  # noqa: BLE001 (the same failure is the same type and message)
        return type(exc).__name__, str(exc), str(exc.__cause__)
    return OmegaConf.to_yaml(cfg), OmegaConf.is_struct(cfg), OmegaConf.is_readonly(cfg)


HAND_WRITTEN = [
    ["n_seeds=3"], ["algorithm=bilevel", "budget.samples=4000", "seeds=[0,1,2]", "env.beta=0.5"],
    ["env.beta=2", "env=mdp"],  # a value before the group it belongs to: set after the group is composed
    ["env=token", "env.vocab=3", "env.length=4", "n_seeds=16"], ["n_seeds=3", "n_seeds=5"],
    ["algorithm=bilevel", "algorithm.c_alpha_z=${algorithm.c_alpha}"], ["objective=gap", "instances=[1,2]"],
    ["instances=null"], ["algorithm=dpo", "algorithm.mode=offline", "algorithm.lr=3.3333333333"],
    ["model.reward.bound=2", "model.reward.kind=tabular", "algorithm=bilevel"], ["experiment=rate_bandit", "n_seeds=2"],
    ["budget.samples=1e5"], ["impl=reference", "progress=false"],
    # refused: a wrong type, an unknown key, a key that is a node, a list for a number, a group given a value
    ["n_seeds=abc"], ["budget.smaples=3"], ["budget=3"], ["env.beta=[1,2]"], ["env=no_such_env", "n_seeds=2"],
    ["+budget.extra=1", "n_seeds=2"], ["~objective", "n_seeds=2"],
]


@pytest.mark.parametrize("overrides", HAND_WRITTEN, ids=lambda o: " ".join(o))
def test_value_overrides_set_on_a_kept_config_give_hydras_config(overrides, monkeypatch):
    """compose() sets `key=value` overrides on the config of the other overrides (config._value_overrides): the
    result, or the error, is Hydra's own for the same overrides."""
    monkeypatch.setattr(config, "_COMPOSED", {})
    assert _outcome(config.compose, overrides) == _outcome(_hydra_itself, overrides)


def test_each_family_of_experiments_composes_to_hydras_config(monkeypatch):
    """The last experiment of each family (compare_*, control_*, rate_*, ...: the name's first word) with its last
    sweep job (the discrete values of its file's hydra.sweeper.params), a seed count and a budget."""
    from ratebench.analysis import evidence
    from ratebench.core.registry import files

    monkeypatch.setattr(config, "_COMPOSED", {})
    families = {p.stem.split("_")[0]: p for p in files("experiment")}
    assert len(families) >= 8
    for path in families.values():
        node = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params")
        params = {str(k): str(v) for k, v in node.items_ex(resolve=False)} if node is not None else {}
        overrides = [f"experiment={path.stem}", *evidence.sweep_combinations(params, ())[0][-1], "n_seeds=2",
                     "budget.samples=777"]
        assert _outcome(config.compose, overrides) == _outcome(_hydra_itself, overrides), overrides


def test_a_config_kept_with_hydra_gives_the_one_without_it(hydra_calls):
    """compose(o) after compose(o, with_hydra=True) (as experiment_configs asks for both) drops `hydra:` from the
    kept one instead of composing again, and equals Hydra's own composition without it: the job's keys, the
    struct flag, the read-only flag. One experiment of each family and a run with groups and values."""
    from ratebench.core.registry import files

    families = {p.stem.split("_")[0]: p.stem for p in files("experiment")}
    for overrides in ([f"experiment={name}"] for name in families.values()), [["algorithm=bilevel", "env=mdp"]]:
        for o in overrides:
            with_hydra = config.compose(o, with_hydra=True)
            calls = len(hydra_calls)
            mine = _outcome(config.compose, o)
            assert len(hydra_calls) == calls, o  # no composition for the config without hydra:
            assert mine == _outcome(_hydra_itself, o), o
            assert "hydra" in with_hydra and "hydra" in config.compose(o, with_hydra=True)  # the kept one keeps it
