"""The test protocol's id and record (jobs/eval_protocol.py) and its config section."""

from __future__ import annotations

import json
import re

import pytest

from jobs.eval_config import EvalConfig, ProtocolConfig
from jobs.eval_protocol import MAST_PROTOCOL, Protocol, write_protocol_file
from typedconfig import ConfigError, load_config

CRW_LIKE = ProtocolConfig(top_k=10, long_term=(), short_term=tuple(range(1, 21)), radius=12,
                          temperature=0.05)  # fmt: skip


def test_the_default_config_is_mast_for_a_model_with_mast_s_test_radius():
    assert Protocol.resolve(ProtocolConfig(), test_radius=12) == MAST_PROTOCOL
    assert MAST_PROTOCOL.id == "mast" and MAST_PROTOCOL.overrides() == ["protocol.radius=12"]
    # The radius is the one that ran: a model reading 13x13 windows is not under MAST's.
    assert Protocol.resolve(ProtocolConfig(), 6).id == "topkall-lt0_5-st1_3_5-r6-tmodel"
    assert Protocol.resolve(ProtocolConfig(radius=12), 6).id == "mast"


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (CRW_LIKE, "topk10-ltnone-st1to20-r12-t0.05"),
        (ProtocolConfig(top_k=10, long_term=(0,), short_term=tuple(range(1, 21)),
                        radius=70, temperature=0.07), "topk10-lt0-st1to20-r70-t0.07"),
        (ProtocolConfig(long_term=(5, 0, 0), short_term=(5, 3, 1)), "mast"),
        (ProtocolConfig(short_term=(1, 2, 5, 6, 7, 9)), "topkall-lt0_5-st1_2_5to7_9-r12-tmodel"),
        (ProtocolConfig(temperature=1e-5), "topkall-lt0_5-st1_3_5-r12-t1e-05"),
    ],
)  # fmt: skip
def test_ids_spell_every_field_canonically(cfg, expected):
    protocol = Protocol.resolve(cfg, test_radius=12)
    assert protocol.id == expected
    # Valid inside an MLflow tag key (mlflow.utils.validation: no commas, brackets or spaces).
    assert re.fullmatch(r"[\w.\-]+", protocol.id)


def test_the_record_and_the_overrides_give_the_protocol_back(tmp_path):
    crw = Protocol.resolve(CRW_LIKE, 12)
    spec = {"id": crw.id, "top_k": 10, "long_term": [], "short_term": list(range(1, 21)),
            "radius": 12, "temperature": 0.05}  # fmt: skip
    assert crw.spec() == spec
    path = write_protocol_file(tmp_path, "val", crw)
    assert path.name == "protocol-val.json" and json.loads(path.read_text()) == spec
    # The command-line overrides select the same protocol again, whatever the model's radius.
    cfg = load_config(EvalConfig, overrides=crw.overrides())
    assert Protocol.resolve(cfg.protocol, 6) == crw and cfg.protocol == crw.config()
    assert crw.overrides()[:2] == ["protocol.top_k=10", "protocol.long_term=[]"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["protocol.long_term=[]", "protocol.short_term=[2]"], "protocol: frame 1 has no reference"),
        (["protocol.short_term=[0,1]"], "protocol.short_term[0]=0 must be > 0"),
        (["protocol.long_term=[-1]"], "protocol.long_term[0]=-1 must be >= 0"),
        (["protocol.temperature=0"], "protocol.temperature=0.0 must be > 0"),
        (["protocol.top_k=2.5"], "protocol.top_k must be an integer"),
        (["propagation.short_term=[1]"], "propagation.short_term has moved: set protocol.short_term"),
    ],
)  # fmt: skip
def test_protocol_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(EvalConfig, overrides=overrides)


def test_the_eval_configs_run_mast_s_memory():
    for path in ("configs/eval/default.yaml", "configs/eval/demo.yaml"):
        cfg = load_config(EvalConfig, path)
        assert (cfg.protocol.long_term, cfg.protocol.short_term) == ((0, 5), (1, 3, 5)), path
    assert load_config(EvalConfig, "configs/eval/demo.yaml").protocol.radius == 6
