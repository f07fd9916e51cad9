"""Config: validated at start, unknown keys and bad values named."""

from pathlib import Path

import pytest

from node.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_default_config_file_is_valid_and_paths_are_anchored() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert cfg.listener.ae_title == "PACSNODE"
    assert cfg.listener.port == 11112
    assert cfg.storage.path == REPO / "var" / "spool"
    assert cfg.database.url == f"sqlite:///{REPO / 'var' / 'pacsnode.db'}"
    assert cfg.embedded_queue
    assert [d.name for d in cfg.destinations] == ["pacs"]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"listener": {"portt": 1}}, r"listener\.portt: unknown key"),
        ({"listener": {"port": 70000}}, r"listener\.port: Input should be less than or equal to 65535"),
        ({"listener": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, r"listener\.ae_title"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h"}]}, r"destinations\.0: .*port required for protocol dimse"),
        ({"destinations": [{"name": "w", "protocol": "stow"}]}, r"destinations\.0: .*url required for protocol stow"),
        ({"destinations": [{"name": "w", "protocol": "stow", "url": "http://x", "confirm": "cfind"}]},
         r"ae_title, host, port required for protocol stow with confirm cfind"),
        ({"destinations": [{"name": "w", "protocol": "stow", "url": "ftp://x"}]}, r"url must start with http"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h", "port": 1, "objects": ["sr", "pdf"]}]},
         r"destinations\.0\.objects\.1: Input should be 'sr', 'sc', 'seg' or 'gsps'"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h", "port": 1, "confirm": "commit"}]},
         r"destinations\.0\.confirm: Input should be 'none', 'cfind', 'qido' or 'commitment'"),
        ({"destinations": [{"name": "w", "protocol": "stow", "url": "http://x", "confirm": "commitment"}]},
         r"destinations\.0: Value error, confirm: commitment needs protocol dimse, not stow"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h", "port": 1, "confirm": "commitment"}],
          "export": {"calling_ae_title": "AI_SCU"}},
         r"destinations a confirm by commitment: their reports come back to export\.calling_ae_title 'AI_SCU', "
         r"but the listener answers as listener\.ae_title 'PACSNODE'; make the two the same"),
        ({"pipelines": {"chest_xray": {"bundle": "m", "device": "gpu"}}}, r"pipelines\.chest_xray\.device"),
        ({"completion": {"quiet_seconds": -1}}, r"completion\.quiet_seconds"),
        ({"validation": {"tools": ["dciodvfy", "pixelmed"]}},
         r"validation\.tools\.1: Input should be 'dciodvfy' or 'dcmpschk'"),
        ({"validation": {"tools": ["dciodvfy", "dciodvfy"]}}, r"validation\.tools: .*listed twice"),
        ({"validation": None}, r"validation: Input should be a valid dictionary"),
        ([], r"top level must be a mapping"),
    ],
)
def test_bad_values_fail_with_the_key_named(raw: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_duplicate_destination_names_fail() -> None:
    d = {"name": "pacs", "ae_title": "A", "host": "h", "port": 104}
    with pytest.raises(ConfigError, match="destination names must be unique"):
        parse_config({"destinations": [d, d]})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_objects_per_destination_default_to_export_objects_and_the_job_builds_their_union() -> None:
    pacs = {"name": "pacs", "ae_title": "A", "host": "h", "port": 104}
    web = {"name": "web", "protocol": "stow", "url": "http://h/dicom-web", "objects": ["gsps", "sr"]}
    cfg = parse_config({"destinations": [pacs, web]})
    assert [d.wants(cfg.export) for d in cfg.destinations] == [("sr", "sc", "seg", "gsps"), ("sr", "gsps")]
    assert cfg.object_kinds() == ("sr", "sc", "seg", "gsps")
    cfg = parse_config({"destinations": [web, {**pacs, "objects": ["seg"]}], "export": {"objects": ["sr"]}})
    assert cfg.object_kinds() == ("sr", "seg", "gsps")
    # Without destinations the job still keeps export.objects under the spool.
    assert parse_config({"export": {"objects": ["sc", "sr"]}}).object_kinds() == ("sr", "sc")


def test_destinations_for_resolves_names_and_the_sender() -> None:
    cfg = parse_config({"destinations": [
        {"name": "pacs", "ae_title": "MAINPACS", "host": "h", "port": 104},
        {"name": "ed", "ae_title": "ED_CR", "host": "h2", "port": 104},
    ]})
    assert [d.name for d in cfg.destinations_for(None, "X")] == ["pacs", "ed"]
    assert [d.name for d in cfg.destinations_for(["sender", "pacs", "ed"], "ED_CR")] == ["ed", "pacs"]
    with pytest.raises(ValueError, match="no destination has AE title 'MODALITY9'"):
        cfg.destinations_for(["sender"], "MODALITY9")
    with pytest.raises(ValueError, match="destination 'gone' is no longer configured"):
        cfg.destinations_for(["gone"], None)
    assert cfg.object_kinds([]) == ("sr", "sc", "seg", "gsps")


@pytest.mark.parametrize(
    ("queue", "match"),
    [
        ({"heartbeat_seconds": 40, "lost_after_seconds": 60}, r"lost_after_seconds must be at least twice heartbeat"),
        ({"backoff_max_seconds": 400}, r"backoff_max_seconds must be shorter than requeue_queued_seconds"),
        ({"task_time_limit": 900, "visibility_timeout": 600}, r"visibility_timeout must be longer than task_time_limit"),
    ],
)
def test_queue_timings_that_would_lose_or_steal_jobs_fail(queue: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"queue": queue})


def test_errors_in_a_file_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "listener:\n"
        "  port: 11112\n"
        "routing:\n"
        "  rules:\n"
        "    - name: fine\n"
        "      match: {Modality: CR}\n"
        "    - name: broken\n"
        "      match:\n"
        "        Modality: {regex: 'CR('}\n"
        "storage:\n"
        "  pathh: spool\n"
    )
    with pytest.raises(ConfigError, match=r"line 9: routing\.rules\[broken\]\.match\.Modality\.regex: .*invalid regex") as e:
        load_config(path)
    assert "line 11: storage.pathh: unknown key" in str(e.value)


def test_a_pipeline_id_names_registered_code_and_its_own_result_series() -> None:
    two = {"chest_xray": {"bundle": "models/chest_xray"},
           "pneumonia": {"bundle": "models/pneumonia", "implementation": "chest_xray", "series_number_base": 9910}}
    cfg = parse_config({"pipelines": two})
    assert cfg.pipelines["pneumonia"].series_numbers() == {"sr": 9911, "sc": 9912, "seg": 9913, "gsps": 9914}
    assert cfg.pipelines["chest_xray"].series_numbers()["sr"] == 9901
    with pytest.raises(ConfigError, match=r"pipelines: Value error, pneumonia: no pipeline code registered as "
                                          r"'pneumonia' \(registered: chest_xray\); set pneumonia\.implementation"):
        parse_config({"pipelines": {**two, "pneumonia": {"bundle": "models/pneumonia"}}})
    clash = {**two, "pneumonia": {**two["pneumonia"], "series_number_base": 9902}}
    with pytest.raises(ConfigError, match=r"pneumonia\.series_number_base 9902: its result series would share "
                                          r"numbers with those of chest_xray \(base 9900\); .* e\.g\. 9910"):
        parse_config({"pipelines": clash})
    # A disabled pipeline makes no results: its range may overlap.
    parse_config({"pipelines": {**clash, "pneumonia": {**clash["pneumonia"], "enabled": False}}})
