"""The settings of `pacsys-supervisor`, owned once: the schema and where values come from.

`schema` is the `Settings` struct (every setting, its default, bounds and help; the rules
between settings); `sources` reads the TOML file, the environment and the command line
into it, errors named where the value came from. Neither touches anything else: the checks
of files and secrets a start makes are `pacsys.supervised.startup_checks`, the example file
`pacsys.supervised.example_config`.
"""

from pacsys.settings.schema import FIELDS, POLICY_TYPES, ConfigError, Field, Settings, flag_name, range_text
from pacsys.settings.sources import (
    env_name,
    env_settings,
    load_config,
    read_config_file,
    setting_sources,
    settings_from,
)

__all__ = [
    "FIELDS",
    "POLICY_TYPES",
    "ConfigError",
    "Field",
    "Settings",
    "env_name",
    "env_settings",
    "flag_name",
    "load_config",
    "range_text",
    "read_config_file",
    "setting_sources",
    "settings_from",
]
