"""MASTConfig: the one definition of the model's settings, and checkpoints that predate a key."""

import dataclasses

import pytest
import torch

from model import MAST, MASTConfig
from typedconfig import ConfigError, from_dict, to_dict


def test_bad_choice_names_the_allowed_values():
    with pytest.raises(ConfigError, match="channel_dropout"):
        from_dict(MASTConfig, {"channel_dropout": "always"})
    with pytest.raises(ValueError, match=r"model.channel_dropout='always' is not allowed"):
        MAST(channel_dropout="always")
    with pytest.raises(ValueError, match=r"model.width=0 must be > 0"):
        MAST(width=0)


def test_model_config_matches_the_model_constructor():
    args = to_dict(MASTConfig())
    assert MAST(**{**args, "width": 8}).model_args == {**args, "width": 8}
    assert MAST(MASTConfig(width=8), feat_dim=16).config == MASTConfig(width=8, feat_dim=16)


def test_a_checkpoint_without_a_newer_key_loads_with_its_default():
    model = MAST(width=4, feat_dim=8)
    args = model.model_args
    del args["chunk_size"], args["max_dilation"]  # as if written before these keys existed
    rebuilt = MAST.from_state({"model_args": args, "model": model.state_dict()})
    assert rebuilt.config == MASTConfig(width=4, feat_dim=8)
    assert rebuilt.config.chunk_size == 0 and rebuilt.config.max_dilation == 4
    for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_key_this_version_does_not_know_is_refused_by_name():
    args = {**MASTConfig().as_args(), "future_knob": 3}
    with pytest.raises(ConfigError, match=r"model_args \['future_knob'\] are not settings"):
        MASTConfig.from_args(args)


def test_every_setting_is_a_field_with_a_default():
    # One definition: the training config's `model:` section is this dataclass itself.
    from jobs.train_config import TrainConfig

    assert {f.name: f.type for f in dataclasses.fields(TrainConfig)}["model"] in (
        "MASTConfig",
        MASTConfig,
    )
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(MASTConfig))
