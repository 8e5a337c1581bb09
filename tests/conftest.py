"""Shared fixtures: a private F-hat* cache, one torch thread, and config composition."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["RATEBENCH_CACHE"] = str(tmp_path_factory.mktemp("fstar-cache"))
    os.environ.setdefault("CI", "true")  # no progress lines in test output
    yield


@pytest.fixture
def compose_config():
    """compose_config([overrides]) -> the run config Hydra would build (without `hydra:`)."""
    from hydra import compose, initialize_config_module

    from ratebench.config import register

    register()

    def _compose(overrides=()):
        with initialize_config_module(config_module="ratebench.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose
