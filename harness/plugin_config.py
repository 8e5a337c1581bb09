"""Hydra's view of the plug-ins: their conf folders on the search path and a preset for each registered
algorithm and environment that has no preset file (docs/architecture.md "Plug-ins and registries")."""
from __future__ import annotations

from omegaconf import OmegaConf

from ratebench.core.registry import find_file, search_path

SEARCH_PATH_RESOLVER = "rb_search_path"  # hydra.searchpath in conf/config.yaml


def register_presets(cs) -> None:
    """Store `algorithm/<name>` and `env/<name>` (the Config's defaults) for every registered algorithm and
    environment without a `<group>/<name>.yaml` in a conf folder, and the search-path resolver."""
    from ratebench.algorithms import ALGORITHMS
    from ratebench.envs import ENVIRONMENTS

    if not OmegaConf.has_resolver(SEARCH_PATH_RESOLVER):
        OmegaConf.register_new_resolver(SEARCH_PATH_RESOLVER, search_path)
    for group, registry, schema in (("algorithm", ALGORITHMS, lambda cls: cls.Config),
                                    ("env", ENVIRONMENTS, lambda spec: spec.Config)):
        for name, item in registry.items():
            if find_file(group, name) is None:
                cs.store(group=group, name=name, node=schema(item))
