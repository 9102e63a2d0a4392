"""The run configuration: typed sections, YAML loading, `key.sub=value` overrides, validation.

Every field carries its own help text (`python launch.py --help-config` prints them all).
- `fields.py`: the error type, `opt(default, help)` and the value checks,
- `sections.py`: run, model, data, optimizer, schedule, checkpoints, logging, evaluation,
- `teacher.py`: the frozen teachers' section (each method's own section lives in its module, trainer/methods/),
- `schema.py`: the root `Config` and the checks that span sections,
- `loading.py`: YAML files with `base:`, overrides, coercion, validation.
"""

from .fields import ConfigError, files_unchecked
from .loading import CONFIG_DIR, DEFAULT_CONFIG, PROJECT_ROOT, build_config, describe, dump_yaml, load_config, to_dict
from .schema import Config

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "PROJECT_ROOT", "Config", "ConfigError", "build_config", "describe",
           "files_unchecked",
           "dump_yaml", "load_config", "to_dict"]
