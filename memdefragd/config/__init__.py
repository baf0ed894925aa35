"""The YAML configuration, each setting declared once.

- schema.py: every setting (key, kind, default, bounds, help) and the config it makes;
- walk.py: how a setting is declared, and the generic walk that reads YAML by it;
- kinds.py: the kinds of value (sizes, durations, shares, choices, ...) with their bounds;
- load.py: reading the file safely, YAML, and errors at file:line:key;
- plan.py: what a config asks of the scheduler and of the backend.

docs/configuration.md is generated from the declarations (tools/configuration_doc.py).
"""

from .load import DEFAULT_PATH, MAX_CONFIG_BYTES, ConfigError, load_config, parse_config
from .plan import check_methods, methods, scheduler_settings
from .schema import Config, DaemonSettings, SimProcessSettings, SimulatedSettings
from .walk import MAX_ERRORS, MAX_VALUES, Setting

__all__ = [
    "DEFAULT_PATH",
    "MAX_CONFIG_BYTES",
    "MAX_ERRORS",
    "MAX_VALUES",
    "Config",
    "ConfigError",
    "DaemonSettings",
    "Setting",
    "SimProcessSettings",
    "SimulatedSettings",
    "check_methods",
    "load_config",
    "methods",
    "parse_config",
    "scheduler_settings",
]
