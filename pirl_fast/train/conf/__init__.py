"""Hydra config tree for `python -m pirl_fast.train` (a package so `initialize_config_module` finds it).

Importing it registers the dataclass schema (`pirl_schema`) that config.yaml composes against.
"""

import pirl_fast.train.config  # noqa: F401  (registers pirl_schema in Hydra's ConfigStore)
