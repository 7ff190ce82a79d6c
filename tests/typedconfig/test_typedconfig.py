"""typedconfig: precedence, validation messages, conversions, round trips."""

import dataclasses
from typing import ClassVar, Literal

import pytest

from typedconfig import (
    ConfigError,
    config_help,
    flatten,
    from_dict,
    load_config,
    to_dict,
)


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    gaps: tuple[int, ...] = (2, 5, 8)
    size: tuple[int, int] = (256, 256)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 10
    use_gpu: Literal["auto", "true", "false"] = "auto"
    flag: bool = False
    scale: float | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps={self.steps} must be > 0")


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["inner.lr=0.25", "inner.gaps=[1, 3]", "scale=2"])
    assert cfg.steps == 20 and cfg.inner.lr == 0.25 and cfg.inner.gaps == (1, 3)
    assert cfg.scale == 2.0 and cfg.inner.size == (256, 256) and cfg.name == "x"


def test_unknown_key_names_the_allowed_keys():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key inner.lrr; allowed keys under inner: \['lr', 'gaps', 'size'\]",
    ):
        load_config(Outer, overrides=["inner.lrr=1"])


@dataclasses.dataclass(frozen=True)
class Moved:
    MOVED_KEYS: ClassVar[dict[str, str]] = {"lr": "optim.lr"}

    steps: int = 10


def test_a_moved_key_is_refused_with_its_new_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("steps: 3\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^config key lr has moved: set optim.lr instead$"):
        load_config(Moved, path)
    assert load_config(Moved, overrides=["steps=3"]).steps == 3
    assert "MOVED_KEYS" not in flatten(Moved())  # a ClassVar, not a key


def test_bad_choice_names_the_allowed_values():
    with pytest.raises(
        ConfigError,
        match=r"use_gpu='maybe' is not allowed; choose one of \['auto', 'true', 'false'\]",
    ):
        load_config(Outer, overrides=["use_gpu=maybe"])


def test_yaml_booleans_fill_string_choices():
    # `use_gpu=true` parses as a YAML boolean; the choice means the word.
    assert load_config(Outer, overrides=["use_gpu=true"]).use_gpu == "true"
    assert load_config(Outer, overrides=["use_gpu=false"]).use_gpu == "false"


def test_type_errors_and_validate():
    with pytest.raises(ConfigError, match="steps must be an integer"):
        load_config(Outer, overrides=["steps=1.5"])
    with pytest.raises(ConfigError, match=r"inner.size must have 2 items"):
        load_config(Outer, overrides=["inner.size=[1, 2, 3]"])
    with pytest.raises(ConfigError, match="steps=0 must be > 0"):
        load_config(Outer, overrides=["steps=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, overrides=["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, "no/such/file.yaml")


def test_round_trip_flatten_and_help():
    cfg = load_config(Outer, overrides=["flag=yes", "inner.size=[64, 32]"])
    assert cfg.flag is True
    assert from_dict(Outer, to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["inner.size"] == [64, 32] and flat["use_gpu"] == "auto"
    assert "  inner.lr = 0.001" in config_help(Outer)


def test_jobs_accept_overrides_anywhere():
    from jobs.train import parse_args

    args = parse_args(
        [
            "optim.lr=1e-4",
            "--data",
            "d/manifest.json",
            "scaling.use_gpu=true",
            "--stages",
            "pretrain",
        ]
    )
    assert args.data == "d/manifest.json" and args.stages == "pretrain"
    assert args.overrides == ["optim.lr=1e-4", "scaling.use_gpu=true"]
