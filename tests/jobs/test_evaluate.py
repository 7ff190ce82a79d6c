"""jobs.evaluate end to end on the generated DAVIS sample: results layout, CSVs recomputed from
the written PNGs, bad sequences reported while the rest is scored, Ray == local, MLflow run,
version tags and alias promotion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from davis.io import (
    read_mask,
    read_result_masks,
    sequence_files,
    write_mask,
    write_results_csvs,
)
from davis.metrics import evaluate_sequence, global_scores
from jobs.eval_config import EvalConfig
from jobs.eval_mlflow import EvalSet, ModelRef, decide_promotion
from jobs.eval_protocol import MAST_PROTOCOL, Protocol
from jobs.evaluate import EvalError, cli, davis_set_id, evaluate, main, parse_args
from jobs.mlflow_keys import set_tag, version_tag
from model import MAST
from tests.jobs.conftest import make_davis_sample
from typedconfig import load_config

GOOD = ["bigbuckbunny-00", "bikes-01"]


def tiny_state(seed=0):
    # Random weights; a sharp softmax (scale 20) makes even these propagate some labels, so
    # the predictions are not all background.
    torch.manual_seed(seed)
    model = MAST(width=8, feat_dim=16, scale=20.0)
    return {"model_args": model.model_args, "model": model.state_dict()}


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    root = make_davis_sample(tmp_path_factory.mktemp("davis"), "num_sequences=2", "num_frames=5")
    ann, img = root / "Annotations" / "480p", root / "JPEGImages" / "480p"
    for bad in ("missing-frame", "size-mismatch", "no-objects"):
        shutil.copytree(ann / GOOD[0], ann / bad)
        shutil.copytree(img / GOOD[0], img / bad)
    (img / "missing-frame" / "00002.jpg").unlink()
    write_mask(ann / "size-mismatch" / "00003.png", np.zeros((48, 60), np.uint8))
    write_mask(ann / "no-objects" / "00000.png", np.zeros((48, 64), np.uint8))
    names = [*GOOD, "missing-frame", "size-mismatch", "no-objects", "not-there"]
    (root / "ImageSets" / "2017" / "all.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_state(), path)
    return path


def local_cfg(output, *extra):
    return load_config(
        EvalConfig,
        overrides=[
            f"output={output}",
            "ray.enabled=false",
            "mlflow.enabled=false",
            "protocol.radius=4",
            "compare_colour=false",  # its own test below
            *extra,
        ],
    )


def test_results_layout_and_csvs_recomputed_from_disk(davis_root, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "global_results-val.csv").write_text("stale\n")
    summary = evaluate(str(checkpoint), davis_root, local_cfg(out))
    assert summary["scored"] == 2 and summary["failed"] == [] and summary["scope"] == "full"
    assert json.loads((out / "summary.json").read_text())["scores"] == summary["scores"]
    objects, propagated = [], 0
    for name in GOOD:
        files = sequence_files(davis_root, name)
        pred = read_result_masks(out, name, files.frame_ids)
        gt = np.stack([read_mask(p) for p in files.masks])
        np.testing.assert_array_equal(pred[0], gt[0])  # frame 0 is the ground truth
        with Image.open(out / name / "00001.png") as im:
            assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
        propagated += int((pred[1:] > 0).sum())
        objects += evaluate_sequence(name, gt, pred)
        with Image.open(out / "_overlays" / f"{name}.gif") as gif:
            assert gif.n_frames == 5
    # Random weights: small objects may fade out in a sequence, but not everywhere.
    assert propagated > 0
    # The CSVs equal an independent re-scoring of the PNGs on disk, in the official format.
    expected = tmp_path / "expected"
    write_results_csvs(expected, "val", objects)
    for csv in ("global_results-val.csv", "per-sequence_results-val.csv"):
        assert (out / csv).read_text() == (expected / csv).read_text()
    rows = (out / "per-sequence_results-val.csv").read_text().splitlines()
    assert rows[0] == "Sequence,J-Mean,F-Mean" and rows[1].startswith("bigbuckbunny-00_1,")
    assert 0 < summary["scores"]["J&F-Mean"] < 1


def test_bad_sequences_are_reported_and_the_rest_scored(davis_root, checkpoint, tmp_path):
    summary = evaluate(str(checkpoint), davis_root, local_cfg(tmp_path, "split=all"))
    failed = {f["sequence"]: f["error"] for f in summary["failed"]}
    assert summary["scored"] == 2 and set(failed) == {
        "missing-frame",
        "size-mismatch",
        "no-objects",
        "not-there",
    }
    assert "annotations without frames ['00002']" in failed["missing-frame"]
    assert (
        "00003.png: annotation is 60x48 but the frames of size-mismatch are 64x48"
        in failed["size-mismatch"]
    )
    assert "first annotation has no object" in failed["no-objects"]
    assert "no frames in" in failed["not-there"]
    assert summary["scope"] == "partial 2/6"
    rows = (tmp_path / "per-sequence_results-all.csv").read_text().splitlines()[1:]
    assert {r.split("_")[0] for r in rows} == set(GOOD)


def test_sequence_names_that_leave_their_folder_are_refused(davis_root, checkpoint, tmp_path):
    # A split file is data: `../evil` would read <root>/JPEGImages/evil and write the results
    # to <output>/../evil. Such names fail alone; the rest is scored.
    root = shutil.copytree(davis_root, tmp_path / "root")
    for kind in ("JPEGImages", "Annotations"):
        shutil.copytree(root / kind / "480p" / GOOD[0], root / kind / "evil")
    names = [GOOD[0], "../evil", "a/b", ".."]
    (root / "ImageSets" / "2017" / "escape.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "results" / "out"
    summary = evaluate(str(checkpoint), root, local_cfg(out, "split=escape"))
    failed = {f["sequence"]: f["error"] for f in summary["failed"]}
    assert summary["scored"] == 1 and set(failed) == {"../evil", "a/b", ".."}
    assert all("is not a folder name" in e for e in failed.values())
    assert not (tmp_path / "results" / "evil").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["_overlays", GOOD[0]]


def test_label_ids_beyond_the_model_channels(davis_root, checkpoint, tmp_path):
    summary = evaluate(
        str(checkpoint), davis_root, local_cfg(tmp_path, "propagation.max_objects=3")
    )
    failed = {f["sequence"]: f["error"] for f in summary["failed"]}
    # bigbuckbunny-00 has 3 objects (ids 1..3: 4 channels), bikes-01 too; both are refused.
    assert all("propagation.max_objects=3" in e for e in failed.values()) and failed
    assert summary["scores"] is None
    assert not (tmp_path / "global_results-val.csv").exists()


def test_unreadable_model(davis_root, tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EvalError, match="cannot load model .*garbage.pt"):
        evaluate(str(bad), davis_root, local_cfg(tmp_path / "out"))
    with pytest.raises(EvalError, match="no-such-root is not a directory"):
        evaluate(str(bad), tmp_path / "no-such-root", local_cfg(tmp_path / "out"))


def test_bad_config_and_store_give_one_line_errors(davis_root, tmp_path, capsys):
    base = ["--model", "models:/mast/14", "--davis-root", str(davis_root), "ray.enabled=false"]
    cases = {
        "propagation.radiuss=4": "unknown config key propagation.radiuss",
        "protocol.radius=abc": "protocol.radius must be an integer",
        "protocol.top_k=0": "protocol.top_k=0 must be > 0",
        "propagation.radius=4": "config key propagation.radius has moved: set protocol.radius",
        "--config=/nonexistent.yaml": "config file /nonexistent.yaml does not exist",
        "mlflow.tracking_uri=foo://bar": "'foo://bar'",
        f"--output={davis_root / 'ImageSets' / '2017' / 'val.txt'}": "val.txt is a file; give a",
    }
    for arg, message in cases.items():
        assert cli([*base, arg]) == 2, arg
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    # The real command line: no traceback.
    cmd = [sys.executable, "-m", "jobs.evaluate", *base, "propagation.radiuss=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: unknown config key propagation.radiuss" in done.stderr


def test_davis_set_id_follows_the_ground_truth_not_the_path(davis_root, tmp_path):
    cfg = local_cfg(tmp_path)
    moved = shutil.copytree(davis_root, tmp_path / "moved")
    assert davis_set_id(moved, GOOD, cfg) == davis_set_id(davis_root, GOOD, cfg)
    assert davis_set_id(davis_root, GOOD[::-1], cfg) == davis_set_id(davis_root, GOOD, cfg)
    assert davis_set_id(davis_root, GOOD[:1], cfg) != davis_set_id(davis_root, GOOD, cfg)
    ignore_void = local_cfg(tmp_path, "ignore_void=true")
    assert davis_set_id(davis_root, GOOD, ignore_void) != davis_set_id(davis_root, GOOD, cfg)
    write_mask(moved / "Annotations" / "480p" / GOOD[1] / "00004.png", np.zeros((48, 64), np.uint8))
    assert davis_set_id(moved, GOOD, cfg) != davis_set_id(davis_root, GOOD, cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_tasks_give_the_same_results_as_a_sequential_run(davis_root, checkpoint, tmp_path):
    import ray

    local = evaluate(str(checkpoint), davis_root, local_cfg(tmp_path / "local"))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = local_cfg(
            tmp_path / "ray", "ray.enabled=true", "ray.max_in_flight=1", "ray.num_cpus=1"
        )
        remote = evaluate(str(checkpoint), davis_root, cfg)
    finally:
        ray.shutdown()
    assert remote["scores"] == local["scores"]
    for name in GOOD:
        for png in sorted((tmp_path / "local" / name).glob("*.png")):
            assert png.read_bytes() == (tmp_path / "ray" / name / png.name).read_bytes()
    for csv in ("global_results-val.csv", "per-sequence_results-val.csv"):
        assert (tmp_path / "local" / csv).read_text() == (tmp_path / "ray" / csv).read_text()


# ---------------------------------------------------------------------------------------------
# MLflow


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two registered versions of a tiny model, logged with the training engineer's helper."""
    from jobs.registry import compute_example, register_stage_model
    from jobs.tracking import setup_runs

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    runs = setup_runs(uri, "train", "reg", {"pretrain": {}})
    frames = torch.randint(0, 256, (1, 2, 3, 16, 16), dtype=torch.uint8)
    gaps = torch.tensor([[2]])
    for seed in (0, 1):
        state = tiny_state(seed)
        example = compute_example(MAST.from_state(state), frames, gaps)
        register_stage_model(
            uri=uri, run_id=runs.child_run_ids["pretrain"], model_name="mast-eval-test",
            stage="pretrain", state=state, example=example, tags={},
        )  # fmt: skip
    return uri


def test_mlflow_run_version_tags_and_promotion(davis_root, registry, tmp_path):
    client = MlflowClient(registry, registry_uri=registry)
    args = [
        "--model", "models:/mast-eval-test/1", "--davis-root", str(davis_root),
        "--output", str(tmp_path / "v1"), "--promote", "champion",
        "ray.enabled=false", "protocol.radius=4", f"mlflow.tracking_uri={registry}",
        "compare_colour=false",
    ]  # fmt: skip
    first = main(parse_args(args))
    assert (
        first["promotion"]["promoted"] and "alias champion was free" in first["promotion"]["reason"]
    )
    assert str(client.get_model_version_by_alias("mast-eval-test", "champion").version) == "1"
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.tags["model_name"] == "mast-eval-test" and run.data.tags["model_version"] == "1"
    assert run.data.metrics["JF-Mean"] == pytest.approx(first["scores"]["J&F-Mean"])
    assert run.data.metrics["J-Decay"] == pytest.approx(first["scores"]["J-Decay"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "global_results-val.csv",
        "per-sequence_results-val.csv",
        "per_sequence_table.json",
        "failures.json",
        "overlays",
    } <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "overlays")) == 2
    v1 = client.get_model_version("mast-eval-test", "1")
    assert float(v1.tags[version_tag("val", "JF_mean")]) == pytest.approx(
        first["scores"]["J&F-Mean"], abs=1e-6
    )
    assert v1.tags[version_tag("val", "scope")] == "full"
    assert v1.tags[version_tag("val", "run_id")] == run.info.run_id
    line = "J&F {:.3f} (J {:.3f}, F {:.3f})".format(
        *(first["scores"][k] for k in ("J&F-Mean", "J-Mean", "F-Mean"))
    )
    r4 = "topkall-lt0_5-st1_3_5-r4-tmodel"  # MAST's protocol but radius 4
    assert first["protocol"]["id"] == r4
    assert v1.description == f"DAVIS val set {first['davis_set']} protocol {r4}: {line}"
    assert run.data.tags["mlflow.note.content"] == (
        f"DAVIS val evaluation of models:/mast-eval-test/1 (full, 2/2 sequences scored, set "
        f"{first['davis_set']}, protocol {r4}): {line}"
    )
    # The numbers also sit on the version's LoggedModel page (MLflow 3).
    logged = client.get_logged_model(str(v1.source).removeprefix("models:/"))
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["davis_val/JF-Mean"] == pytest.approx(first["scores"]["J&F-Mean"])

    # Version 2 is promoted only if it beats version 1 on the same split.
    args2 = [a.replace("mast-eval-test/1", "mast-eval-test/2").replace("/v1", "/v2") for a in args]
    second = main(parse_args(args2))
    beats = second["scores"]["J&F-Mean"] > first["scores"]["J&F-Mean"]
    assert second["promotion"]["promoted"] == beats
    holder = "2" if beats else "1"
    assert str(client.get_model_version_by_alias("mast-eval-test", "champion").version) == holder
    reason = client.get_run(second["mlflow_run_id"]).data.tags["promotion.champion"]
    assert reason == second["promotion"]["reason"] and (
        "beats" in reason or "does not beat" in reason
    )
    davis_set = first["davis_set"]
    assert second["davis_set"] == davis_set
    jf_tag = set_tag("val", davis_set, r4, "JF_mean")
    assert v1.tags[jf_tag] == v1.tags[version_tag("val", "JF_mean")]
    assert v1.tags[version_tag("val", "set")] == davis_set

    # A partial evaluation neither replaces the version's full numbers nor promotes.
    loser = "1" if beats else "2"
    before = client.get_model_version("mast-eval-test", loser).tags
    partial_args = [a.replace("mast-eval-test/1", f"mast-eval-test/{loser}") for a in args]
    partial = main(parse_args([*partial_args, "--sequences", GOOD[0]]))
    assert partial["scope"] == "partial 1/2" and not partial["promotion"]["promoted"]
    after = client.get_model_version("mast-eval-test", loser).tags
    assert {k: v for k, v in after.items() if k.startswith("davis.")} == {
        k: v for k, v in before.items() if k.startswith("davis.")
    }

    # Scores on other data (another root, one annotation changed) are not compared with the
    # holder's: it has none on that set, so the alias stays and the reason says why.
    other = shutil.copytree(davis_root, tmp_path / "other")
    write_mask(other / "Annotations" / "480p" / GOOD[1] / "00004.png", np.zeros((48, 64), np.uint8))
    other_args = [a.replace(str(davis_root), str(other)) for a in partial_args]
    third = main(parse_args(other_args))
    assert third["scope"] == "full" and third["davis_set"] != davis_set
    assert not third["promotion"]["promoted"]
    assert (
        f"has no full J&F on val set {third['davis_set']} under protocol {r4} (its val results: "
        f"{davis_set} ({r4}))" in (third["promotion"]["reason"])
    )
    assert str(client.get_model_version_by_alias("mast-eval-test", "champion").version) == holder
    tags = client.get_model_version("mast-eval-test", loser).tags
    assert float(tags[set_tag("val", third["davis_set"], r4, "JF_mean")]) == pytest.approx(
        third["scores"]["J&F-Mean"], abs=1e-6
    )
    assert tags[jf_tag] == before[jf_tag]


def test_models_load_from_the_given_store_with_logging_off(
    davis_root, registry, tmp_path, monkeypatch
):
    monkeypatch.setenv("MAST_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [
        "--model", "models:/mast-eval-test/1", "--davis-root", str(davis_root),
        "--output", str(tmp_path / "out"), "--sequences", GOOD[0], "ray.enabled=false",
        "protocol.radius=4", "mlflow.enabled=false", f"mlflow.tracking_uri={registry}",
    ]  # fmt: skip
    summary = main(parse_args(args))
    assert summary["scores"] is not None and "mlflow_run_id" not in summary
    assert not (tmp_path / "runs").exists()  # the default store was not created
    with pytest.raises(
        EvalError,
        match=f"cannot load model 'models:/nope/1' from the MLflow store {registry} .*nope",
    ):
        main(parse_args([a.replace("mast-eval-test/1", "nope/1") for a in args]))
    missing = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    with pytest.raises(EvalError, match="no MLflow store at .*elsewhere/mlflow.db"):
        main(parse_args([*args[:-1], f"mlflow.tracking_uri={missing}"]))
    assert not (tmp_path / "elsewhere").exists()


def test_promotion_decisions(registry):
    client = MlflowClient(registry, registry_uri=registry)
    name = "mast-eval-test"
    client.set_registered_model_alias(name, "gold", "1")
    ref = ModelRef("models:/mast-eval-test/2", name, "2")
    a, b = "a" * 12, "b" * 12  # DAVIS set ids
    client.set_model_version_tag(name, "1", set_tag("test-dev", a, "mast", "JF_mean"), "0.5")
    # The split-level tags (latest full evaluation, any set) are never compared.
    client.set_model_version_tag(name, "1", version_tag("test-dev", "JF_mean"), "0.1")
    client.set_model_version_tag(name, "1", version_tag("test-dev", "scope"), "full")
    on_a = EvalSet("test-dev", a, MAST_PROTOCOL, "full")
    assert decide_promotion(client, ref, "gold", on_a, 0.6).promoted
    tie = decide_promotion(client, ref, "gold", on_a, 0.5)
    assert not tie.promoted
    assert f"does not beat version 1's 0.5000 on test-dev set {a} under protocol mast" in tie.reason
    partial = decide_promotion(
        client, ref, "gold", EvalSet("test-dev", a, MAST_PROTOCOL, "partial 1/2"), 0.9
    )
    assert not partial.promoted and "partial 1/2" in partial.reason
    on_b = EvalSet("test-dev", b, MAST_PROTOCOL, "full", "/data/B")
    other = decide_promotion(client, ref, "gold", on_b, 0.9)
    assert not other.promoted
    assert (
        f"has no full J&F on test-dev set {b} under protocol mast (its test-dev results: {a} "
        "(mast))" in other.reason
    )
    assert other.reason.endswith(
        "--model models:/mast-eval-test/1 --davis-root /data/B --split test-dev protocol.radius=12"
    )
    unknown = decide_promotion(client, ref, "gold", EvalSet("train", a, MAST_PROTOCOL, "full"), 0.9)
    assert not unknown.promoted and "(its train results: none)" in unknown.reason
    same = decide_promotion(client, ModelRef("x", name, "1"), "gold", on_a, 0.9)
    assert not same.promoted and "already holds" in same.reason


def test_promotion_compares_only_results_under_the_same_protocol(registry):
    client = MlflowClient(registry, registry_uri=registry)
    name = "mast-eval-test"
    client.set_registered_model_alias(name, "silver", "1")
    ref = ModelRef("models:/mast-eval-test/2", name, "2")
    s = "c" * 12  # a set on a split of its own: the other tests' results are not listed
    crw = Protocol(top_k=10, long_term=(), short_term=tuple(range(1, 21)), radius=12,
                   temperature=0.05)  # fmt: skip
    client.set_model_version_tag(name, "1", set_tag("holdout", s, "mast", "JF_mean"), "0.5")
    # Tagged before protocols were recorded: its protocol is unknown, so it is never compared.
    client.set_model_version_tag(name, "1", f"davis.holdout.{s}.JF_mean", "0.1")
    # A higher J&F under CRW's protocol is not compared with the holder's under MAST's.
    under_crw = decide_promotion(
        client, ref, "silver", EvalSet("holdout", s, crw, "full", "/d"), 0.9
    )
    assert not under_crw.promoted
    assert under_crw.reason == (
        f"not promoted: holder version 1 has no full J&F on holdout set {s} under protocol "
        f"topk10-ltnone-st1to20-r12-t0.05 (its holdout results: {s} (mast), {s} (protocol not "
        "recorded)); scores on other data or under another protocol are not comparable. "
        "Evaluate it on this set under this protocol first: python -m jobs.evaluate --model "
        "models:/mast-eval-test/1 --davis-root /d --split holdout protocol.top_k=10 "
        "protocol.long_term=[] protocol.short_term=[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,"
        "18,19,20] protocol.radius=12 protocol.temperature=0.05"
    )
    # Under MAST's protocol the holder's 0.5 is the bar (not the unrecorded 0.1).
    assert not decide_promotion(
        client, ref, "silver", EvalSet("holdout", s, MAST_PROTOCOL, "full"), 0.4
    ).promoted
    assert decide_promotion(
        client, ref, "silver", EvalSet("holdout", s, MAST_PROTOCOL, "full"), 0.6
    ).promoted
    client.set_model_version_tag(name, "1", set_tag("holdout", s, crw.id, "JF_mean"), "0.95")
    assert not decide_promotion(
        client, ref, "silver", EvalSet("holdout", s, crw, "full"), 0.9
    ).promoted


def test_promote_needs_a_registered_model_and_bad_uris_are_recorded(
    davis_root, checkpoint, registry, tmp_path
):
    args = [
        "--model",
        str(checkpoint),
        "--davis-root",
        str(davis_root),
        "--output",
        str(tmp_path),
        "--promote",
        "champion",
        f"mlflow.tracking_uri={registry}",
        "ray.enabled=false",
    ]
    with pytest.raises(EvalError, match="--promote champion needs a registered model URI"):
        main(parse_args(args))
    with pytest.raises(EvalError, match="cannot resolve model 'models:/mast-eval-test@nope'"):
        main(
            parse_args(
                [
                    "--model",
                    "models:/mast-eval-test@nope",
                    *args[2:6],
                    f"mlflow.tracking_uri={registry}",
                ]
            )
        )
    client = MlflowClient(registry)
    exp = client.get_experiment_by_name("mast-eval")
    failed = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert any("models:/mast-eval-test@nope" in r.data.tags["error"] for r in failed)
    # An unknown alias or model names what exists, logging on or off.
    for extra in ([], ["mlflow.enabled=false"]):
        with pytest.raises(EvalError, match=r"aliases of mast-eval-test: .*versions: 1, 2"):
            main(
                parse_args(
                    ["--model", "models:/mast-eval-test@nope", *args[2:6], *args[8:], *extra]
                )
            )
        with pytest.raises(EvalError, match="registered models in this store: mast-eval-test"):
            main(parse_args(["--model", "models:/other@x", *args[2:6], *args[8:], *extra]))


def test_an_evaluation_done_before_is_reused_unless_forced(
    davis_root, checkpoint, tmp_path, monkeypatch
):
    # Logging off: the output's summary.json is the record. A second identical evaluation
    # writes no prediction (a deleted one stays deleted) and returns the same numbers.
    out = tmp_path / "local"
    first = evaluate(str(checkpoint), davis_root, local_cfg(out))
    assert "reused" not in first and len(first["eval_key"]) == 24
    shutil.rmtree(out / GOOD[0])
    again = evaluate(str(checkpoint), davis_root, local_cfg(out, "ray.max_in_flight=7"))
    assert again["reused"] == str(out / "summary.json") and again["scores"] == first["scores"]
    assert not (out / GOOD[0]).exists()  # nothing was evaluated
    # An option that changes a number is another evaluation; --force evaluates again.
    other = evaluate(str(checkpoint), davis_root, local_cfg(out, "protocol.radius=3"))
    assert "reused" not in other and other["eval_key"] != first["eval_key"]
    forced = evaluate(str(checkpoint), davis_root, local_cfg(out), force=True)
    assert "reused" not in forced and forced["scores"] == first["scores"]
    assert (out / GOOD[0] / "00001.png").is_file()
    # Results on another label grid (model/grid.py) are not these results.
    monkeypatch.setattr("jobs.eval_reuse.LABEL_GRID", "another-grid")
    regrid = evaluate(str(checkpoint), davis_root, local_cfg(out))
    assert "reused" not in regrid and regrid["eval_key"] != first["eval_key"]


def test_a_logged_evaluation_is_reused_from_mlflow_without_a_new_run(
    davis_root, registry, tmp_path
):
    client = MlflowClient(registry, registry_uri=registry)
    args = [
        "--model", "models:/mast-eval-test/2", "--davis-root", str(davis_root),
        "--output", str(tmp_path / "a"), "ray.enabled=false", "protocol.radius=4",
        f"mlflow.tracking_uri={registry}", "mlflow.experiment=reuse", "compare_colour=false",
    ]  # fmt: skip

    def runs():
        exp = client.get_experiment_by_name("reuse")
        return client.search_runs([exp.experiment_id], "tags.`mast.role` = 'evaluation'")

    first = main(parse_args(args))
    assert len(runs()) == 1 and "reused" not in first
    logged = {a.path for a in client.list_artifacts(first["mlflow_run_id"])}
    assert "summary.json" in logged
    # Another output folder: the result comes from the run, its CSVs copied there.
    elsewhere = [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in args]
    second = main(parse_args(elsewhere))
    assert len(runs()) == 1 and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["scores"] == first["scores"] and "MLflow run" in second["reused"]
    for name in ("global_results-val.csv", "per-sequence_results-val.csv", "protocol-val.json"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["reused"] == second["reused"]
    # The same weights through a checkpoint path are the same model: reused too.
    path = tmp_path / "v2.pt"
    torch.save(tiny_state(1), path)  # version 2's weights (the registry fixture's seed 1)
    as_file = [a.replace("models:/mast-eval-test/2", str(path)) for a in args]
    assert main(parse_args(as_file))["mlflow_run_id"] == first["mlflow_run_id"]
    third = main(parse_args([*args, "--force"]))
    assert len(runs()) == 2 and third["mlflow_run_id"] != first["mlflow_run_id"]


def test_every_evaluation_reports_the_colour_baseline_beside_the_model(
    davis_root, checkpoint, registry, tmp_path
):
    client = MlflowClient(registry, registry_uri=registry)
    common = [
        "--davis-root", str(davis_root), "ray.enabled=false", "protocol.radius=4",
        f"mlflow.tracking_uri={registry}", "mlflow.experiment=colour",
    ]  # fmt: skip

    def runs():
        exp = client.get_experiment_by_name("colour")
        return {r.data.tags["model_uri"] for r in client.search_runs([exp.experiment_id])}

    out = tmp_path / "model"
    model = main(parse_args(["--model", str(checkpoint), "--output", str(out), *common]))
    colour = model["colour_baseline"]
    assert runs() == {str(checkpoint), "baseline:colour"}  # each its own evaluation run
    base = json.loads((out / "_baseline_colour" / "summary.json").read_text())
    assert colour["J&F-Mean"] == base["scores"]["J&F-Mean"] and 0 < colour["J&F-Mean"] <= 1
    assert colour["difference"] == pytest.approx(model["scores"]["J&F-Mean"] - colour["J&F-Mean"])
    logged = client.get_run(model["mlflow_run_id"]).data.metrics["JF-Mean_minus_colour"]
    assert logged == pytest.approx(colour["difference"])
    # The baseline asked for by name is that same evaluation (same set and options): reused.
    direct = main(
        parse_args(["--model", "baseline:colour", "--output", str(tmp_path / "c"), *common])
    )
    assert direct["mlflow_run_id"] == colour["mlflow_run_id"] and direct["colour_baseline"] is None
    # --force scores the model again, and the baseline beside it too (a new run of each).
    forced = main(
        parse_args(["--model", str(checkpoint), "--output", str(out), *common, "--force"])
    )
    assert forced["mlflow_run_id"] != model["mlflow_run_id"]
    assert forced["colour_baseline"]["mlflow_run_id"] != colour["mlflow_run_id"]
    assert forced["colour_baseline"]["J&F-Mean"] == colour["J&F-Mean"]
    # Copy-first scores what copying the first annotation scores, computed independently.
    copy = main(
        parse_args(["--model", "baseline:copy-first", "--output", str(tmp_path / "f"), *common])
    )
    objects = []
    for name in GOOD:
        gt = np.stack([read_mask(p) for p in sequence_files(davis_root, name).masks])
        objects += evaluate_sequence(name, gt, np.repeat(gt[:1], len(gt), axis=0))
    assert copy["scores"] == pytest.approx(global_scores(objects))
    assert len(runs()) == 3
    with pytest.raises(EvalError, match=r"unknown baseline 'baseline:x'; choose one of"):
        main(parse_args(["--model", "baseline:x", "--output", str(tmp_path / "x"), *common]))


# ---------------------------------------------------------------------------------------------
# Test protocols (jobs/eval_protocol.py)


def test_an_evaluation_is_reused_only_under_the_same_protocol(davis_root, checkpoint, tmp_path):
    out = tmp_path / "out"
    top10 = evaluate(str(checkpoint), davis_root, local_cfg(out, "protocol.top_k=10"))
    assert "reused" not in top10 and top10["protocol"]["id"] == "topk10-lt0_5-st1_3_5-r4-tmodel"
    again = evaluate(str(checkpoint), davis_root, local_cfg(out, "protocol.top_k=10"))
    assert again["reused"] == str(out / "summary.json") and again["scores"] == top10["scores"]
    top5 = evaluate(str(checkpoint), davis_root, local_cfg(out, "protocol.top_k=5"))
    assert "reused" not in top5 and top5["eval_key"] != top10["eval_key"]
    assert top5["protocol"]["id"] == "topk5-lt0_5-st1_3_5-r4-tmodel"
    # The model's own radius (its test_radius, 12) spelled out is the same protocol: MAST's.
    mast = evaluate(str(checkpoint), davis_root, local_cfg(out, "protocol.radius=12"))
    assert "reused" not in mast and mast["protocol"]["id"] == "mast"
    left_open = evaluate(str(checkpoint), davis_root, local_cfg(out, "protocol.radius=null"))
    assert left_open["reused"] and left_open["eval_key"] == mast["eval_key"]
    assert json.loads((out / "protocol-val.json").read_text()) == {
        "id": "mast", "top_k": None, "long_term": [0, 5], "short_term": [1, 3, 5], "radius": 12,
        "temperature": None,
    }  # fmt: skip


def test_a_non_default_protocol_is_recorded_with_every_result(davis_root, registry, tmp_path):
    client = MlflowClient(registry, registry_uri=registry)
    common = [
        "--davis-root", str(davis_root), "ray.enabled=false", f"mlflow.tracking_uri={registry}",
        "mlflow.experiment=protocols", "--promote", "bronze", "overlay=none",
    ]  # fmt: skip
    # Version 2 takes the free alias under MAST's protocol (radius 4 aside).
    first = main(
        parse_args(["--model", "models:/mast-eval-test/2", "--output", str(tmp_path / "v2"),
                    *common, "protocol.radius=4", "compare_colour=false"])
    )  # fmt: skip
    assert first["promotion"]["promoted"]
    # Version 1 under a CRW-like protocol, the colour baseline beside it.
    crw = ["protocol.top_k=10", "protocol.temperature=0.05", "protocol.long_term=[0]",
           "protocol.short_term=[1,2,3]", "protocol.radius=4"]  # fmt: skip
    out = tmp_path / "v1"
    second = main(parse_args(["--model", "models:/mast-eval-test/1", "--output", str(out),
                              *common, *crw]))  # fmt: skip
    pid = "topk10-lt0-st1to3-r4-t0.05"
    spec = {"id": pid, "top_k": 10, "long_term": [0], "short_term": [1, 2, 3], "radius": 4,
            "temperature": 0.05}  # fmt: skip
    assert second["protocol"] == spec
    # Beside the CSVs (which keep the official columns), in summary.json.
    assert json.loads((out / "protocol-val.json").read_text()) == spec
    assert json.loads((out / "summary.json").read_text())["protocol"] == spec
    assert (out / "global_results-val.csv").read_text().startswith("J&F-Mean,J-Mean,J-Recall,")
    # The run: tags and the resolved config as params.
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["davis.protocol"] == pid
    assert json.loads(run.data.tags["davis.protocol.spec"]) == spec
    params = run.data.params
    assert (params["protocol.top_k"], params["protocol.radius"]) == ("10", "4")
    assert params["protocol.temperature"] == "0.05" and params["protocol.long_term"] == "[0]"
    assert "protocol-val.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # The colour baseline ran under the same protocol (its temperature is the protocol's).
    colour = client.get_run(second["colour_baseline"]["mlflow_run_id"])
    assert colour.data.tags["davis.protocol"] == pid and colour.data.tags["model_uri"] == (
        "baseline:colour"
    )
    # The version: the score under (set, protocol), and the latest result's protocol.
    tags = client.get_model_version("mast-eval-test", "1").tags
    jf = tags[set_tag("val", second["davis_set"], pid, "JF_mean")]
    assert float(jf) == pytest.approx(second["scores"]["J&F-Mean"], abs=1e-6)
    assert tags[set_tag("val", second["davis_set"], pid, "run_id")] == run.info.run_id
    assert tags[version_tag("val", "protocol")] == pid
    assert json.loads(tags[version_tag("val", "protocol_spec")]) == spec
    # Promotion: version 2 holds bronze with a score under another protocol only.
    assert not second["promotion"]["promoted"]
    assert (
        f"has no full J&F on val set {second['davis_set']} under protocol {pid}"
        in (second["promotion"]["reason"])
    )
    assert second["promotion"]["reason"].endswith(
        "--split val protocol.top_k=10 protocol.long_term=[0] protocol.short_term=[1,2,3] "
        "protocol.radius=4 protocol.temperature=0.05"
    )
    assert str(client.get_model_version_by_alias("mast-eval-test", "bronze").version) == "2"
