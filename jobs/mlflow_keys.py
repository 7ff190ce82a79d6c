"""Every name the jobs write to MLflow or look up there: the registered model, its aliases, and
the tag keys of runs and model versions. Defined once; `jobs.train`, `jobs.evaluate` and
`jobs.demo` all use these (a renamed tag would otherwise leave one reader searching for the
old name)."""

from __future__ import annotations

# The registered model (mlflow.registered_model's default) and the alias --promote moves.
MODEL_NAME = "mast"
CHAMPION = "champion"


def latest_alias(stage: str) -> str:
    """The alias that follows the newest registered version of a stage."""
    return f"{stage}-latest"


# Training runs: one parent per invocation and one child per stage, found again by these.
RUN_NAME = "mast.run_name"
ROLE = "mast.role"
STAGE = "mast.stage"
ROLE_PARENT, ROLE_STAGE = "parent", "stage"

# MLflow's own tag for a run's description (what its UI shows and edits as "Description").
RUN_DESCRIPTION = "mlflow.note.content"

# Tags of a stage's run: lineage, and what a resume or a corrupt input did.
DATA_HASH = "data.hash"
DATA_NUM_SAMPLES = "data.num_samples"
DATA_NUM_SHARDS_SKIPPED = "data.num_shards_skipped"
DATA_SHARDS_SKIPPED = "data.shards_skipped"
DATA_MANIFEST_HASH = "data.manifest_hash"
RESUMED_FROM = "resumed_from"
INIT_FROM = "init_from"
CORRUPT_CHECKPOINTS_SKIPPED = "corrupt_checkpoints_skipped"
INIT_FROM_CORRUPT_SKIPPED = "init_from_corrupt_skipped"
STOPPED = "stopped"

# Tags of a registered model version, written by jobs.train.
VERSION_STAGE = "stage"
VERSION_GIT_COMMIT = "git_commit"
VERSION_DATA_HASH = "data_hash"
VERSION_FINAL_LOSS = "final_loss"
VERSION_RUN_NAME = "run_name"
VERSION_STEP = "step"


# Evaluations (jobs.evaluate): scores on a model version, per DAVIS split and set.
def metric_key(measure: str) -> str:
    """MLflow names allow no '&': J&F-Mean -> JF-Mean."""
    return measure.replace("&", "")


# An evaluation run's test protocol (jobs.eval_protocol): its id, and the fields as JSON.
RUN_PROTOCOL = "davis.protocol"
RUN_PROTOCOL_SPEC = "davis.protocol.spec"


def version_tag(split: str, what: str) -> str:
    """The latest full evaluation on `split`, whatever its set and protocol (display only)."""
    return f"davis.{split}.{what}"


def set_tag(split: str, davis_set: str, protocol: str, what: str) -> str:
    """A full evaluation on one set of data under one protocol (its jobs.eval_protocol id):
    the tags promotion compares."""
    return f"davis.{split}.{davis_set}.{protocol}.{what}"


def promotion_tag(alias: str) -> str:
    """The reason a run moved (or did not move) `alias`."""
    return f"promotion.{alias}"
