"""Declarative routing rules: conditions, modes, validation at start, `pacsnode rules test`,
and the decision travelling from a real association to the job row and the queue message."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node.cli import db_upgrade, main
from node.completion import CompletionService
from node.config import Condition, ConfigError, RoutingConfig, parse_config
from node.db.models import Job, Series
from node.db.session import session_scope
from node.handlers import IngestContext
from node.listener import start_listener
from node.queue import broker_priority
from node.routing import SeriesAttributes, holds, route
from tests.peers import free_port, have, storescu

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
CR = "1.2.840.10008.5.1.4.1.1.1"
PIPES = ("chest_xray",)


@pytest.mark.parametrize(
    ("cond", "value", "expected"),
    [
        ("CR", "cr ", True),  # equality ignores case and padding
        ("CR", None, False),
        (["CR", "DX"], "DX", True),
        ({"in": ["CR", "DX"]}, "CT", False),
        ({"regex": "^CHE"}, "CHEST", True),
        ({"regex": "DERIVED\\\\PRIMARY"}, ["DERIVED", "PRIMARY"], True),  # regex sees the joined value
        ("PRIMARY", ["DERIVED", "PRIMARY"], True),  # multi-valued: any value
        ({"min": 1000, "max": 3000}, "2140", True),
        ({"min": 1000}, "999", False),
        ({"max": 10}, "abc", False),  # not a number: no match
        ({"absent": True}, None, True),
        ({"absent": True}, "X", False),
        ({"present": True}, "X", True),
        ({"not": "CHEST"}, None, True),  # absent is "not CHEST"
        ({"present": True, "not": "CHEST"}, None, False),  # ...unless presence is required
        ({"present": True, "not": {"in": ["PA", "AP"]}}, "LL", True),
        (5, "5.0", True),
    ],
)
def test_conditions(cond: Any, value: Any, expected: bool) -> None:
    assert holds(Condition.model_validate(cond), value) is expected


def _rules(*rules: dict[str, Any], mode: str = "first", **extra: Any) -> RoutingConfig:
    return parse_config({"routing": {"mode": mode, "rules": list(rules)}, **extra}).routing


STAT = {"name": "stat", "match": {"CallingAE": "ED_CR"}, "priority": 9, "destinations": ["sender"],
        "objects": ["sr", "gsps"]}
LATERAL = {"name": "lateral", "match": {"ViewPosition": ["LL", "RL"]}, "action": "skip",
           "reason": "lateral view {ViewPosition} from {CallingAE}"}
CHEST = {"name": "chest", "match": {"BodyPartExamined": "CHEST"}, "destinations": ["pacs"]}
DEST = {"destinations": [{"name": "pacs", "ae_title": "P", "host": "127.0.0.1", "port": 104}]}


def _attrs(view: str, calling: str) -> SeriesAttributes:
    return SeriesAttributes(CR, "CR", "CHEST", view, {"CallingAE": calling})


def test_first_match_decides_and_records_why() -> None:
    cfg = _rules(STAT, LATERAL, CHEST, **DEST)
    d = route(_attrs("LL", "ED_CR"), cfg, PIPES)
    assert (d.rule, d.priority, d.destinations, d.pipelines) == ("stat", 9, ("sender",), PIPES)
    d = route(_attrs("LL", "WARD"), cfg, PIPES)
    assert d.skipped and d.rule == "lateral" and d.reason == "lateral view LL from WARD"
    assert d.trace[0] == "stat: no match (CallingAE is 'WARD', wanted {equals: 'ED_CR'})"
    d = route(SeriesAttributes(CR, "CR", "KNEE", "PA"), cfg, PIPES)
    assert d.skipped and d.reason == "no routing rule matches" and len(d.trace) == 3


def test_all_matches_add_up_and_a_skip_wins() -> None:
    cfg = _rules(STAT, LATERAL, CHEST, mode="all", **DEST)
    d = route(_attrs("PA", "ED_CR"), cfg, PIPES)
    assert (d.rule, d.priority, d.destinations) == ("stat, chest", 9, ("sender", "pacs"))
    assert d.objects is None  # "chest" limits nothing, so every object its destinations want
    assert route(_attrs("LL", "ED_CR"), cfg, PIPES).rule == "lateral"


def test_a_rule_without_destinations_means_every_destination() -> None:
    cfg = _rules(STAT, {"name": "any", "match": {}}, mode="all", **DEST)
    assert route(_attrs("PA", "ED_CR"), cfg, PIPES).destinations is None


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ({"name": "r1", "match": {"Modalty": "CR"}}, r"routing\.rules\[r1\]\.match: .*'Modalty' is neither a DICOM keyword"),
        ({"name": "r2", "match": {"Modality": {"regex": "(CR"}}}, r"routing\.rules\[r2\]\.match\.Modality\.regex: .*invalid regex"),
        ({"name": "r3", "match": {"Rows": {"min": 5, "max": 1}}}, r"routing\.rules\[r3\]\.match\.Rows: .*min 5\.0 is greater than max 1\.0"),
        ({"name": "r4", "match": {"PatientID": "X"}}, r"routing\.rules\[r4\]\.match: .*PatientID identifies the patient"),
        ({"name": "r5", "action": "maybe"}, r"routing\.rules\[r5\]\.action"),
        ({"name": "r6", "priority": 12}, r"routing\.rules\[r6\]\.priority"),
        ({"name": "r7", "destinations": ["nowhere"]}, r"routing rule 'r7': unknown destination 'nowhere'"),
        ({"name": "r8", "pipelines": ["brain"]}, r"routing rule 'r8': unknown pipeline 'brain'"),
        ({"name": "r9", "match": {"Modality": {"equal": "CR"}}}, r"routing\.rules\[r9\]\.match\.Modality\.equal: unknown key"),
        ({"name": "r10", "match": {"Modality": True}}, r"routing\.rules\[r10\]\.match\.Modality: .*bare true/false"),
    ],
)
def test_invalid_rules_fail_at_start_naming_the_rule(rule: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"routing": {"rules": [rule]}})


def test_rules_test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"routing": {"rules": [STAT, LATERAL, CHEST]}, **DEST}))
    assert main(["--config", str(cfg), "rules", "test", str(RG1)]) == 0
    out = capsys.readouterr().out
    assert "stat: no match (CallingAE is 'absent'" in out
    assert "=> process by rule chest: chest_xray at priority 4, results to pacs" in out
    assert main(["--config", str(cfg), "rules", "test", str(RG1), "--calling-ae", "ED_CR", "--json"]) == 0
    decided = json.loads(capsys.readouterr().out)
    assert (decided["rule"], decided["priority"], decided["destinations"]) == ("stat", 9, ["sender"])


def test_broker_priority_direction() -> None:
    cfg = parse_config({})
    assert broker_priority(cfg, 9) == 0  # Redis and the embedded transport serve 0 first
    amqp = parse_config({"queue": {"broker_url": "amqp://guest@localhost//"}})
    assert broker_priority(amqp, 9) == 9


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
def test_rule_decision_reaches_the_job_and_the_queue(tmp_path: Path) -> None:
    cfg = parse_config({
        "listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": "any"},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "completion": {"quiet_seconds": 0},
        "routing": {"rules": [STAT, CHEST]}, **DEST,
    })
    db_upgrade(cfg)
    ctx = IngestContext(cfg)
    server = start_listener(cfg, ctx)
    try:
        other = tmp_path / "other.dcm"
        ds = pydicom.dcmread(RG1)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (pydicom.uid.generate_uid() for _ in range(3))
        ds.save_as(other)
        assert storescu(cfg.listener.port, RG1, aet="ED_CR").returncode == 0
        assert storescu(cfg.listener.port, other, aet="WARD").returncode == 0
    finally:
        server.shutdown()
    job_ids = CompletionService(cfg, ctx.tracker).tick()
    assert len(job_ids) == 2
    with session_scope(cfg.database.url) as s:
        jobs = {j.study.calling_ae: j for j in s.scalars(select(Job))}
        assert (jobs["ED_CR"].priority, jobs["ED_CR"].destinations, jobs["ED_CR"].objects) == (9, ["sender"], ["sr", "gsps"])
        assert (jobs["WARD"].priority, jobs["WARD"].destinations, jobs["WARD"].objects) == (4, ["pacs"], None)
        # What the worker builds for each: the rule's objects limit what the destinations want.
        assert cfg.object_kinds(cfg.destinations, jobs["ED_CR"].objects) == ("sr", "gsps")
        assert cfg.object_kinds(cfg.destinations, jobs["WARD"].objects) == ("sr", "sc", "seg", "gsps")
        series = {se.routing_rule: se for se in s.scalars(select(Series))}
        record = series["stat"].routing_attributes
        assert record is not None
        assert (record["CallingAE"], record["CalledAE"], record["SourceAddress"]) == ("ED_CR", "PACSNODE", "127.0.0.1")
        assert record["ImageType"] == ["DERIVED", "PRIMARY"]
        assert not {"PatientName", "PatientID"} & set(record)
        stat_id = jobs["ED_CR"].id
    # The embedded broker's message for the STAT job carries the most urgent priority.
    messages = [json.loads(p.read_text()) for p in (cfg.storage.path / "queue" / "messages").glob("*.msg")]
    by_job = {json.loads(base64.b64decode(m["body"]))[0][0]: m for m in messages}
    assert by_job[stat_id]["properties"]["priority"] == 0
