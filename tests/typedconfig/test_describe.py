"""Key descriptions come from the comments beside each field: one source for --help, the
defaults files and configs/REFERENCE.md."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.defaults import default_configs
from typedconfig import config_help, load_config
from typedconfig.describe import HIDDEN, field_docs, hidden_keys, key_docs


@dataclasses.dataclass(frozen=True)
class Inner:
    """A nested section. Its second sentence is not shown."""

    lr: float = 1e-3  # peak learning rate


@dataclasses.dataclass(frozen=True)
class Example:
    # Clip geometry: frames start + offsets. Shared by the two fields below it.
    clip_len: int = 2
    frame_step: int = 1
    quality: int = 95  # JPEG quality (1..100)
    uncommented: int = 3

    # A block above a field, and
    # its continuation.
    max_in_flight: int = 0  # 0 = 2 x CPUs
    fault_at_step: int = dataclasses.field(default=-1, metadata={HIDDEN: True})  # test knob
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_descriptions_are_the_comments_beside_each_field():
    docs = field_docs(Example)
    group = "Clip geometry: frames start + offsets. Shared by the two fields below it."
    assert docs["clip_len"] == group and docs["frame_step"] == group
    assert docs["quality"] == "JPEG quality (1..100)"
    assert docs["uncommented"] == ""  # a field with its own comment ended the group
    assert docs["max_in_flight"] == "A block above a field, and its continuation. 0 = 2 x CPUs"
    assert docs["fault_at_step"] == "test knob"
    assert [d.key for d in key_docs(Example)] == [
        "clip_len", "frame_step", "quality", "uncommented", "max_in_flight", "inner.lr",
    ]  # fmt: skip
    assert hidden_keys(Example) == {"fault_at_step"}


def test_help_shows_each_key_with_its_default_and_description_and_hides_test_knobs():
    text = config_help(Example)
    assert "  inner.lr = 0.001\n      peak learning rate" in text
    assert "  uncommented = 3\n      (no description)" in text
    assert "fault_at_step" not in text
    # Hidden is not invalid: the key still loads.
    assert load_config(Example, overrides=["fault_at_step=2"]).fault_at_step == 2


@pytest.mark.parametrize("job", sorted(default_configs()))
def test_every_key_of_every_job_says_what_it_means(job):
    cls = type(default_configs()[job])
    missing = [d.key for d in key_docs(cls) if not d.description]
    assert missing == [], f"add a comment beside these fields of {cls.__name__}: {missing}"


def test_job_help_explains_zero_and_none_and_hides_the_fault_knob(capsys):
    from jobs.evaluate import parse_args as evaluate_args
    from jobs.ingest import parse_args as ingest_args
    from jobs.train import parse_args as train_args

    shown = {}
    for name, parse in [("train", train_args), ("ingest", ingest_args), ("eval", evaluate_args)]:
        with pytest.raises(SystemExit):
            parse(["--help"])
        shown[name] = capsys.readouterr().out
    train, ingest, evaluate = shown["train"], shown["ingest"], shown["eval"]
    assert "model.scale = None\n      affinity scale; None = 1/sqrt(feat_dim)" in train
    assert "fault_at_step" not in train and "schedule.warmup_steps = 0" in train
    assert "max_in_flight = 0\n      0 = 2 x (cluster CPUs / task_cpus)" in ingest
    assert "protocol.radius = None\n      window radius; None = the model's" in evaluate
    # The description is the module's own text, not a pointer to it.
    assert "see module docstring" not in train
