"""Ground floor: typed, frozen configuration for every job. Imports no other package of
this project.

Every job's settings are a frozen dataclass with a `validate()` method. A config is built from
(in order of precedence) dataclass defaults < a YAML file < `key=value` overrides from the
command line, validated before any work starts (an error names the bad key and the allowed
keys or values), saved with every run and checkpoint (`to_dict`) and logged to MLflow
flattened (`flatten`).

    cfg = load_config(TrainConfig, "configs/train/pretrain.yaml", ["optim.lr=3e-4"])
"""

from typedconfig.convert import build, convert, split_list
from typedconfig.errors import ConfigError, choice, positive
from typedconfig.export import config_help, dump_yaml, flatten, to_dict, to_plain
from typedconfig.load import (
    deep_update,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    replace,
    set_path,
)

__all__ = [
    "ConfigError",
    "build",
    "choice",
    "config_help",
    "convert",
    "deep_update",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_config",
    "parse_override",
    "positive",
    "read_yaml",
    "replace",
    "set_path",
    "split_list",
    "to_dict",
    "to_plain",
]
