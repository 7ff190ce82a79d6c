"""jobs.train in-process (ScalingConfig(num_workers=0)): configs, bad input, stage chaining,
registry round trip, resume and non-finite loss. Multi-worker Ray runs: test_train_ray.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.checkpoint import CheckpointError
from jobs.ray_fit import TrainingError, check_fits
from jobs.registry import load_example, load_model, run_example
from jobs.stage_dir import StageDir
from jobs.tracking import TrackingError
from jobs.train import main, parse_args
from jobs.train_config import load_stage_configs
from jobs.train_data import describe_data
from jobs.worker import build_optimizer
from storage import ObjectPath
from typedconfig import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs/train/demo.yaml")


def _args(tmp_path: Path, manifest, *extra: str, stages: str = "pretrain", run: str = "t"):
    return parse_args(
        [
            "--config", DEMO, "--stages", stages, "--data", str(manifest), "--run-name", run,
            f"storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
            "scaling.num_workers=0", "checkpoint.every_steps=2", "mlflow.log_every_steps=2",
            *extra,
        ]
    )  # fmt: skip


def _runs(tmp_path: Path, run: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mast-train")
    return client, client.search_runs([exp.experiment_id], f"tags.`mast.run_name` = '{run}'")


def test_config_typo_and_mismatch_are_named():
    with pytest.raises(
        ConfigError, match=r"unknown config key optim.lrr; allowed keys under optim"
    ):
        load_stage_configs(DEMO, ["pretrain"], ["optim.lrr=1e-3"])
    # What is long-term is the model's setting alone; the loader is given it.
    with pytest.raises(ConfigError, match="unknown config key loader.long_term_gap"):
        load_stage_configs(DEMO, ["dynamic"], ["loader.long_term_gap=20"])
    (dyn,) = load_stage_configs(DEMO, ["dynamic"], ["model.long_term_gap=20"])
    assert dyn.model.long_term_gap == 20
    with pytest.raises(ConfigError, match="--stages.*choose one of"):
        load_stage_configs(DEMO, ["pretrian"], [])
    with pytest.raises(ConfigError, match="run_name='a b' may only hold letters"):
        load_stage_configs(DEMO, ["main"], ["run_name=a b"])
    # Run directories may live on an object store (tests/jobs/test_object_store.py).
    (main,) = load_stage_configs(DEMO, ["main"], ["storage_path=s3://bucket/ray/"])
    assert main.storage_path == "s3://bucket/ray/"
    assert StageDir.of(main, "r").path == ObjectPath("s3://bucket/ray/r-main")
    with pytest.raises(ConfigError, match="set the stage with --stages"):
        load_stage_configs(DEMO, ["main"], ["loader.stage=pretrain"])
    with pytest.raises(ConfigError, match=r"storage_path=.*demo.yaml, a file; give a directory"):
        load_stage_configs(DEMO, ["main"], [f"storage_path={DEMO}/ray"])
    with pytest.raises(ConfigError, match="a path: quote globs"):  # the shell expanded a glob
        load_stage_configs(DEMO, ["main"], [DEMO])
    # Each stage starts from the previous one's weights: backwards or twice is refused.
    for stages in (["main", "pretrain"], ["pretrain", "pretrain"], ["pretrain", "dynamic", "main"]):
        with pytest.raises(
            ConfigError, match="order pretrain -> main -> dynamic, each at most once"
        ):
            load_stage_configs(DEMO, stages, [])
    assert [c.stage for c in load_stage_configs(DEMO, ["main", "dynamic"])] == ["main", "dynamic"]


def test_workers_no_node_can_place_are_refused_or_warned(caplog):
    (cfg,) = load_stage_configs(str(ROOT / "configs/train/pretrain.yaml"), ["pretrain"])
    laptop = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    gpu_node = {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    # 8 workers of 4 CPUs on 2 CPUs: Ray would wait forever; the fix is named.
    with pytest.raises(
        ConfigError,
        match=r"num_workers=8 .* do not fit .* 2 CPUs, 0 GPUs\); "
        r"on this machine pass scaling.num_workers=2 scaling.cpus_per_worker=1",
    ):
        check_fits(cfg, laptop, may_grow=False)
    check_fits(cfg, [gpu_node], may_grow=False)  # one 8-GPU node: the config's target
    # use_gpu auto on a GPU cluster takes a GPU per worker: 8 workers need 8 GPUs.
    small = {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 4.0}}
    with pytest.raises(ConfigError, match="and 1 GPU do not fit"):
        check_fits(cfg, [small], may_grow=False)
    check_fits(cfg, [small, dict(small)], may_grow=False)  # two nodes of 4: fits

    def scaled(**kw):
        return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, **kw))

    with pytest.raises(ConfigError, match="pass scaling.use_gpu=auto"):
        check_fits(scaled(use_gpu="true"), laptop, may_grow=False)
    # Counted as Ray counts (1e-4 units): 10 workers of 0.1 CPU fit on 1 CPU (1.0 // 0.1 == 9).
    check_fits(scaled(num_workers=10, cpus_per_worker=0.1), [laptop[0]], may_grow=False)
    # The suggested fit places: 2 CPUs hold 2 GPU workers, not 4; half-CPU workers stay so.
    cramped = [{"Alive": True, "Resources": {"CPU": 2.0, "GPU": 4.0}}]
    with pytest.raises(ConfigError, match="pass scaling.num_workers=2 scaling.cpus_per_worker=1,"):
        check_fits(cfg, cramped, may_grow=False)
    with pytest.raises(ConfigError, match="num_workers=4 scaling.cpus_per_worker=0.5,"):
        check_fits(scaled(cpus_per_worker=0.5), laptop, may_grow=False)
    check_fits(cfg, [small, {"Alive": False, "Resources": {"GPU": 4.0}}], may_grow=True)
    assert "the stage waits until nodes join the cluster" in caplog.text  # a joined cluster


def test_stage_configs_hold_the_recipe():
    pre, main_, dyn = load_stage_configs(None, ["pretrain", "main", "dynamic"])
    assert (pre.optim.name, pre.optim.lr, pre.loader.batch_size) == ("adam", 1e-3, 12)
    assert pre.loader.pair_gaps == (2, 5, 8) and pre.loader.pair_probs == (0.4, 0.4, 0.2)
    assert pre.model.train_radius == 6 and pre.model.width == 64 and pre.loader.crop_size == 256
    assert pre.schedule.milestone_steps() == [400_000, 600_000, 800_000]
    assert main_.optim.lr < pre.optim.lr and main_.loader.clip_frames == 4
    assert dyn.optim.lr == 2e-5 and dyn.loader.num_long_refs == 2 and dyn.model.long_term_gap == 15
    demo = load_stage_configs(DEMO, ["pretrain", "main", "dynamic"])
    assert [c.stage for c in demo] == ["pretrain", "main", "dynamic"]
    assert all(c.model.width <= 32 and c.loader.crop_size == 64 for c in demo)
    assert demo[2].optim.lr == 2e-5 and demo[0].storage_path.startswith("/")


def test_lr_halves_at_iteration_milestones():
    cfg = load_stage_configs(DEMO, ["pretrain"], ["schedule.steps=10"])[0]
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(cfg, model)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [1e-3] * 4 + [5e-4] * 2 + [2.5e-4] * 2 + [1.25e-4] * 2


def test_relative_data_paths_are_made_absolute(train_shards, monkeypatch):
    # Ray workers change directory, so a relative --data must not reach them as given.
    monkeypatch.chdir(train_shards.parent.parent)
    relative = f"{train_shards.parent.name}/manifest.json"
    info = describe_data(relative)
    sources = [info.shard_set.manifest_url, *info.shards]
    assert all(Path(s).is_absolute() and Path(s).exists() for s in sources)
    assert describe_data(train_shards.parent.name).num_samples == info.num_samples


def test_bad_data_is_reported_clearly(tmp_path, train_shards):
    with pytest.raises(ConfigError, match="no training data: pass --data"):
        describe_data("")
    with pytest.raises(ConfigError, match="does not exist; give a manifest.json"):
        describe_data(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="does not exist; run jobs.ingest"):
        describe_data(str(tmp_path / "nope" / "manifest.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"shards": [], "num_samples": 0}))
    with pytest.raises(ConfigError, match="0 shards and 0 samples: nothing to train on"):
        describe_data(str(empty))  # a directory means its manifest.json
    copy = tmp_path / "copy"
    shutil.copytree(train_shards.parent, copy)
    shards = sorted(copy.glob("shard-*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:700])  # truncated mid-member
    info = describe_data(str(copy / "manifest.json"))
    assert len(info.shards) == len(shards) - 1 and info.num_samples > 0
    # The loader gets the manifest less the corrupt shard: the others keep their counts.
    assert info.shard_set.manifest_url == str(copy / "manifest.json")
    assert info.shard_set.excluded == (shards[0].name,)
    counts = info.shard_set.samples_per_shard
    assert len(counts) == len(info.shards) and sum(counts) == info.num_samples
    intact = describe_data(str(train_shards))
    assert intact.shard_set.manifest_url == str(train_shards)  # intact: the whole manifest
    assert intact.shard_set.excluded == () and len(intact.shards) == len(shards)
    assert len(info.skipped) == 1 and shards[0].name in info.skipped[0]
    # What is trained on: fewer samples, and another hash than the manifest's.
    manifest = json.loads(train_shards.read_text())
    lost = manifest["samples_per_shard"][manifest["shards"].index(shards[0].name)]
    assert info.num_samples == intact.num_samples - lost == manifest["num_samples"] - lost
    assert info.manifest_hash == intact.content_hash == manifest["content_hash"]
    assert info.content_hash != manifest["content_hash"]
    for s in shards[1:]:
        s.write_bytes(b"not a tar at all")
    with pytest.raises(ConfigError, match="every shard is unreadable"):
        describe_data(str(copy / "manifest.json"))
    # Not a manifest (jobs.ingest's assignment.json, a list, bad counts): named, with the fix.
    wrong = tmp_path / "assignment.json"
    for content, problem in [
        ({"videos_per_shard": 1, "shards": [["a.mp4"]]}, "'shards' is [['a.mp4']], not a list"),
        ([], "it holds a JSON list, not an object"),
        ({"shards": ["s.tar"], "num_samples": "abc"}, "'num_samples' is 'abc', not an integer"),
        ({"shards": ["s.tar"], "num_samples": None}, "'num_samples' is None, not an integer"),
        ({"shards": ["s.tar"], "num_samples": 3}, "'samples_per_shard' is not one integer"),
    ]:
        wrong.write_text(json.dumps(content))
        expected = f"{wrong} is not a manifest written by jobs.ingest ({problem}"
        with pytest.raises(ConfigError, match=re.escape(expected) + ".*rerun jobs.ingest"):
            describe_data(str(wrong))


def test_a_stage_the_clips_cannot_serve_is_refused_before_any_work(tmp_path, train_shards):
    # Shards with pretrain's layout (9 consecutive frames) have no reference 15+ frames back:
    # the dynamic stage would fail only when it starts, after pretrain and main have trained.
    data = tmp_path / "shards"
    shutil.copytree(train_shards.parent, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "frame_offsets": list(range(9))}))
    refused = "cannot serve stage 'dynamic'.*Ingest with configs/ingest/dynamic.yaml"
    with pytest.raises(ConfigError, match=refused):
        main(_args(tmp_path, data / "manifest.json", stages="pretrain,main,dynamic"))
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow").exists()


def test_unreachable_tracking_fails_before_any_work(tmp_path, train_shards):
    args = _args(tmp_path, train_shards, "mlflow.tracking_uri=http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="unreachable"):
        main(args)
    with pytest.raises(TrackingError, match="'foo://bar' is not supported; use sqlite:////"):
        main(_args(tmp_path, train_shards, "mlflow.tracking_uri=foo://bar"))
    assert not (tmp_path / "ray").exists()  # stopped before any stage (or Ray) started


def test_three_stages_chain_register_and_reload(tmp_path, train_shards):
    args = _args(tmp_path, train_shards, "schedule.steps=4", stages="pretrain,main,dynamic")
    out = main(args)
    assert [out[s]["version"] for s in ("pretrain", "main", "dynamic")] == [1, 2, 3]
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client, runs = _runs(tmp_path, "t")
    assert sorted(r.data.tags["mast.role"] for r in runs) == ["parent", "stage", "stage", "stage"]
    by_stage = {r.data.tags.get("mast.stage"): r for r in runs}
    for version, stage in enumerate(("pretrain", "main", "dynamic"), start=1):
        mv = client.get_model_version_by_alias("mast", f"{stage}-latest")
        assert int(mv.version) == version
        assert mv.tags["stage"] == stage and len(mv.tags["git_commit"]) >= 7
        assert mv.tags["data_hash"] == json.loads(train_shards.read_text())["content_hash"]
        run = by_stage[stage]
        assert run.info.status == "FINISHED"
        assert float(mv.tags["final_loss"]) == pytest.approx(run.data.metrics["loss"], rel=1e-5)
        assert run.data.params["loader.stage"] == stage and run.data.metrics["ranks_in_sync"] == 1
        assert len(run.inputs.dataset_inputs) == 1
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert "images/step_00000004.png" in images
    # Each stage starts from the previous stage's final weights.
    assert by_stage["main"].data.tags["init_from"] == out["pretrain"]["checkpoint"]
    assert by_stage["dynamic"].data.tags["init_from"] == out["main"]["checkpoint"]
    # The dynamic stage really read long-term references (> 15 frames back).
    history = client.get_metric_history(by_stage["dynamic"].info.run_id, "long_term_refs")
    assert sum(m.value for m in history) > 0
    assert all(
        m.value == 0
        for m in client.get_metric_history(by_stage["main"].info.run_id, "long_term_refs")
    )
    # The registered model reproduces the reconstruction logged with it, exactly.
    model = load_model("models:/mast@dynamic-latest", tracking_uri=uri)
    example = load_example("models:/mast@dynamic-latest", tracking_uri=uri)
    assert example["frames"].shape[1] == 3  # 1 long-term + 1 short-term reference + target
    assert torch.equal(run_example(model, example), example["reconstruction"])
    ckpt = load_model(out["dynamic"]["checkpoint"])
    assert all(
        torch.equal(a, b) for a, b in zip(ckpt.state_dict().values(), model.state_dict().values())
    )

    # The same command again: every stage is done; no new runs or versions.
    again = main(args)
    assert [again[s]["version"] for s in ("pretrain", "main", "dynamic")] == [1, 2, 3]
    assert len(_runs(tmp_path, "t")[1]) == 4


def test_interrupted_run_resumes_with_same_name(tmp_path, train_shards, caplog):
    args = _args(tmp_path, train_shards, "schedule.steps=6", "fault_at_step=3", run="r")
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        main(args)
    stage_dir = tmp_path / "ray" / "r-pretrain"
    assert sorted(p.name for p in stage_dir.glob("checkpoint_*")) == ["checkpoint_00000002"]
    # Other data under the same run name is refused, before any run or dataset is logged.
    other = sorted(train_shards.parent.glob("shard-*.tar"))[0]
    refused = "started on data .* new --run-name .*init_from=.*checkpoint_00000002"
    with pytest.raises(ConfigError, match=refused):
        main(_args(tmp_path, other, "schedule.steps=6", run="r"))
    out = main(args)  # same command: continues from step 2
    assert out["pretrain"]["checkpoint"].endswith("checkpoint_00000006")
    client, runs = _runs(tmp_path, "r")
    assert len(runs) == 2  # one parent, one stage run: no duplicates
    child = next(r for r in runs if r.data.tags["mast.role"] == "stage")
    assert child.data.metrics["resumed_from_step"] == 2 and child.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
    assert sorted(set(steps)) == [2, 4, 6]
    with pytest.raises(ConfigError, match="started on data"):  # nor skipped as finished
        main(_args(tmp_path, other, "schedule.steps=6", run="r"))
    assert len(_runs(tmp_path, "r")[1]) == 2

    # A finished stage is not reused under another model config either, and MLflow is not
    # touched (no "param changed" warnings from setting up the runs).
    caplog.clear()
    with pytest.raises(
        CheckpointError, match=r"stage pretrain of run 'r', finished.*model.width: checkpoint 16"
    ):
        main(_args(tmp_path, train_shards, "schedule.steps=6", "model.width=8", run="r"))
    assert "changed on resume" not in caplog.text
    assert {r.info.status for r in _runs(tmp_path, "r")[1]} == {"FINISHED"}

    # Resuming with another model config is refused before training starts.
    (stage_dir / "stage_done.json").unlink()
    with pytest.raises(CheckpointError, match="model.width: checkpoint 16 != config 8"):
        main(_args(tmp_path, train_shards, "schedule.steps=6", "model.width=8", run="r"))


def test_incompatible_init_checkpoint_is_refused(tmp_path, train_shards):
    first = main(_args(tmp_path, train_shards, "schedule.steps=2", run="a"))
    init = first["pretrain"]["checkpoint"]
    with pytest.raises(CheckpointError, match="model.feat_dim: checkpoint 32 != config 16"):
        main(
            _args(
                tmp_path, train_shards, f"checkpoint.init_from={init}", "model.feat_dim=16", run="b"
            )
        )
    assert not list((tmp_path / "ray" / "b-pretrain").glob("checkpoint_*"))
    _, runs = _runs(tmp_path, "b")  # refused before the stage started: not left RUNNING
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    # A registry URI that names no model: the same one-line error, not MLflow's traceback.
    with pytest.raises(CheckpointError, match=r"init_from='models:/nope/1': .*models:/ URI"):
        main(_args(tmp_path, train_shards, "checkpoint.init_from=models:/nope/1", run="c"))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, train_shards):
    # loss_weight beyond float32 range: the very first loss is inf/nan.
    args = _args(tmp_path, train_shards, "schedule.steps=4", "model.loss_weight=1e39", run="nan")
    with pytest.raises(TrainingError, match=r"non-finite loss \(\w+\) at step 0.*lower optim.lr"):
        main(args)
    assert not list((tmp_path / "ray" / "nan-pretrain").glob("checkpoint_*"))
    _, runs = _runs(tmp_path, "nan")
    assert {r.info.status for r in runs} == {"FAILED"}


def test_corrupt_latest_checkpoint_falls_back_on_resume(tmp_path, train_shards):
    args = _args(tmp_path, train_shards, "schedule.steps=6", "fault_at_step=5", run="c")
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        main(args)
    stage_dir = tmp_path / "ray" / "c-pretrain"
    (stage_dir / "checkpoint_00000004" / "checkpoint.pt").write_bytes(b"\x00" * 100)  # torn write
    out = main(args)
    assert out["pretrain"]["checkpoint"].endswith("checkpoint_00000006")
    recorded = (stage_dir / "corrupt_checkpoints.jsonl").read_text()
    assert "checkpoint_00000004" in recorded and "corrupt" in recorded
    _, runs = _runs(tmp_path, "c")
    child = next(r for r in runs if r.data.tags["mast.role"] == "stage")
    assert child.data.metrics["resumed_from_step"] == 2  # the previous, readable checkpoint
    assert child.data.tags["corrupt_checkpoints_skipped"].endswith("checkpoint_00000004")


def test_corrupt_shards_and_checkpoints_are_recorded_and_skipped(tmp_path, train_shards):
    data = tmp_path / "shards"
    shutil.copytree(train_shards.parent, data)
    shard = sorted(data.glob("shard-*.tar"))[0]
    intact = shard.read_bytes()
    shard.write_bytes(intact[:700])  # truncated mid-member
    manifest = json.loads(train_shards.read_text())
    # Killed while writing the first checkpoint: only the temporary file is there.
    stage_dir = tmp_path / "ray" / "k-pretrain"
    (stage_dir / "checkpoint_00000002").mkdir(parents=True)
    (stage_dir / "checkpoint_00000002" / "checkpoint.pt.tmp-123").write_bytes(b"PK\x03")
    common = ("schedule.steps=4", "mlflow.register=false")
    main(_args(tmp_path, data / "manifest.json", *common, run="k"))  # starts afresh
    records = (stage_dir / "corrupt_checkpoints.jsonl").read_text().splitlines()
    assert len(records) == 1 and "checkpoint_00000002" in records[0]  # once, not per reader
    client, runs = _runs(tmp_path, "k")
    pre = next(r for r in runs if r.data.tags.get("mast.stage") == "pretrain")
    assert pre.data.tags["corrupt_checkpoints_skipped"].endswith("checkpoint_00000002")
    # The skipped shard is in the run: its name, the count, what is trained on, another hash.
    tags = pre.data.tags
    assert tags["data.num_shards_skipped"] == "1" and shard.name in tags["data.shards_skipped"]
    lost = manifest["samples_per_shard"][manifest["shards"].index(shard.name)]
    assert tags["data.num_samples"] == str(manifest["num_samples"] - lost)
    assert tags["data.manifest_hash"] == manifest["content_hash"] != tags["data.hash"]
    recorded = json.loads((stage_dir / "stage_data.json").read_text())
    assert recorded["data_hash"] == tags["data.hash"] and len(recorded["skipped_shards"]) == 1

    # The finished pretrain stage's final checkpoint is corrupt: main starts from the older one.
    (stage_dir / "checkpoint_00000004" / "checkpoint.pt").write_bytes(b"\x00" * 100)
    main(_args(tmp_path, data / "manifest.json", *common, stages="pretrain,main", run="k"))
    client, runs = _runs(tmp_path, "k")
    main_run = next(r for r in runs if r.data.tags.get("mast.stage") == "main")
    assert main_run.info.status == "FINISHED"
    assert main_run.data.tags["init_from"] == str(stage_dir / "checkpoint_00000002")
    assert main_run.data.tags["init_from_corrupt_skipped"].endswith("checkpoint_00000004")
    records = (stage_dir / "corrupt_checkpoints.jsonl").read_text().splitlines()
    assert len(records) == 2 and "checkpoint_00000004" in records[1]

    # None readable: a clear error naming the fix; the runs end FAILED, not RUNNING.
    (stage_dir / "checkpoint_00000002" / "checkpoint.pt").write_bytes(b"\x00" * 100)
    refused = r"stage pretrain of run 'k' left nothing.*delete .*stage_done.json.*init_from="
    with pytest.raises(CheckpointError, match=refused):
        main(_args(tmp_path, data / "manifest.json", *common, stages="pretrain,dynamic", run="k"))
    client, runs = _runs(tmp_path, "k")
    status = {r.data.tags.get("mast.stage", "parent"): r.info.status for r in runs}
    assert status == {
        "parent": "FAILED",
        "pretrain": "FINISHED",
        "main": "FINISHED",
        "dynamic": "FAILED",
    }

    # The shard repaired is other data than the run trained on: a resume is refused.
    shard.write_bytes(intact)
    with pytest.raises(ConfigError, match="started on data"):
        main(_args(tmp_path, data / "manifest.json", *common, run="k"))
