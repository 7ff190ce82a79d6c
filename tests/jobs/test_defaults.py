import yaml

from jobs.defaults import DEFAULTS_DIR, default_configs, main
from typedconfig import from_dict


def test_defaults_files_equal_the_code():
    assert main(["--check"]) == 0, "configs/defaults is stale: run `python -m jobs.defaults`"


def test_defaults_files_load_back_to_the_defaults():
    for name, cfg in default_configs().items():
        values = yaml.safe_load((DEFAULTS_DIR / f"{name}.yaml").read_text())
        assert from_dict(type(cfg), values) == cfg
