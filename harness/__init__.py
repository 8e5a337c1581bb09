"""ratebench: put convergence-rate claims for RLHF algorithms to a statistical test.

This folder is the package root (`ratebench`): the run harness, configuration and CLI.
Environments, algorithms and analysis are the subpackages `ratebench.envs`,
`ratebench.algorithms` and `ratebench.analysis` (folders envs/, algorithms/, analysis/).
"""
__version__ = "0.1.0"
