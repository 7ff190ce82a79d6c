"""What a job prints at its end for a person (the JSON for scripts stays on stdout)."""

from __future__ import annotations

from jobs.train import summary_table


def test_train_ends_with_a_table_of_what_was_registered_and_the_next_command():
    out = {
        "pretrain": {"version": 1, "checkpoint": "/r/demo-pretrain/checkpoint_00000200"},
        "main": {"version": None, "checkpoint": "/r/demo-main/checkpoint_00000200"},
    }
    lines = summary_table(out).splitlines()
    assert lines[1:5] == [
        "trained:",
        "stage     version  alias            final checkpoint",
        "pretrain  1        pretrain-latest  /r/demo-pretrain/checkpoint_00000200",
        "main      -        -                /r/demo-main/checkpoint_00000200",
    ]
    assert (
        lines[-1]
        == "next: python -m jobs.evaluate --model models:/mast@main-latest --davis-root DAVIS"
    )
