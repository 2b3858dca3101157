"""node.config: the repo's config.toml, validation errors naming the key, path anchoring."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from node.config import (ENV_VAR, Config, DeliveryMode, NotifyTarget, RuleSource, config_path, load_config,
                         parse_config)
from node.errors import ConfigError
from node.output import KosFor
from training.inference.settings import Backend, Device
from training.model.checkpoint import load_checkpoint
from training.model.layers import GradcamLayer
from training.model.rule import TriageRule

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"

DESTINATION = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


def _parse(data: dict[str, Any], base: Path = Path("/base")) -> Config:
    return parse_config(data, base)


def _config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        _parse(data)
    return str(info.value)


def test_repo_config_loads_with_documented_defaults() -> None:
    config = load_config(REPO_CONFIG)
    assert config.source == REPO_CONFIG
    assert config.node.ae_title == "ICHNODE"
    assert config.node.port == 11112
    assert config.node.allowed_calling_aets == ()
    assert config.completion.stable_seconds == 30.0
    assert isinstance(config.completion.stable_seconds, float)
    assert config.completion.reopen_failed is False
    assert config.triage.slice_threshold == 0.8
    assert config.triage.positive_fraction == 0.05
    assert config.triage.min_positive_slices == 1
    assert [d.name for d in config.destinations] == ["pacs"]
    pacs = config.destinations[0]
    assert (pacs.ae_title, pacs.host, pacs.port) == ("PACS", "127.0.0.1", 4242)
    # Empty calling AE title in [delivery] falls back to the node's own.
    assert config.calling_ae_title == "ICHNODE"


def test_repo_config_matches_dataclass_defaults() -> None:
    """Every value in config.toml is documented as the default: the two must agree."""
    config = load_config(REPO_CONFIG)
    defaults = parse_config({}, REPO_CONFIG.parent)
    for section in ("node", "storage", "completion", "worker", "triage", "explain", "output", "delivery", "log",
                    "web"):
        assert getattr(config, section) == getattr(defaults, section), section
    # The one exception: the shipped file names the demonstration model; the default is none.
    assert replace(config.model, checkpoint=None) == defaults.model


def test_the_documented_notify_example_has_the_default_values() -> None:
    """config.toml's [[notify]] example is commented out (no webhook by default): its keys
    must still parse and say the defaults."""
    commented = REPO_CONFIG.read_text().split("# [[notify]]\n", 1)[1].splitlines()
    example = "[[notify]]\n" + "\n".join(line[2:] for line in itertools.takewhile(lambda l: l.startswith("# "),
                                                                                   commented))
    (target,) = parse_config(tomllib.loads(example), REPO_CONFIG.parent).notify
    assert {"on", "format", "timeout_seconds"} <= set(tomllib.loads(example)["notify"][0])
    assert target == NotifyTarget(target.url)


def test_a_bad_webhook_url_is_named_but_not_shown() -> None:
    for url in ("ftp://hooks.example/SECRET", "hooks.slack.com/services/SECRET", "https://h:99999/SECRET"):
        message = _config_error({"notify": [{"url": url}]})
        assert "notify[0].url" in message and "SECRET" not in message


def test_repo_config_analyses_with_the_demo_model() -> None:
    checkpoint = load_config(REPO_CONFIG).model.checkpoint
    assert checkpoint == REPO_CONFIG.parent / "models" / "effclass-synthetic-demo.pt"
    assert load_checkpoint(checkpoint)[1].provenance.synthetic  # so every output says DEMO MODEL


def test_empty_checkpoint_means_none() -> None:
    assert parse_config({}, REPO_CONFIG.parent).model.checkpoint is None
    assert _parse({"model": {"checkpoint": ""}}).model.checkpoint is None


def test_empty_tables_give_defaults_and_no_destinations() -> None:
    config = _parse({})
    assert config.node.ae_title == "ICHNODE"
    assert config.destinations == ()
    assert config.source is None


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"nodes": {}}, "nodes"),
        ({"node": {"prot": 11112}}, "node.prot"),
        ({"triage": {"threshold": 0.5}}, "triage.threshold"),
        ({"destinations": [{**DESTINATION, "aet": "X"}]}, "destinations[0].aet"),
    ],
)
def test_unknown_section_or_key_is_named(data: dict[str, Any], named: str) -> None:
    message = _config_error(data)
    assert "unknown" in message
    assert named in message


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"node": {"port": "11112"}}, "node.port"),
        ({"node": {"port": True}}, "node.port"),
        ({"worker": {"min_slices": False}}, "worker.min_slices"),
        ({"completion": {"stable_seconds": "30"}}, "completion.stable_seconds"),
        ({"completion": {"stable_seconds": True}}, "completion.stable_seconds"),
        ({"worker": {"enabled_in_serve": 1}}, "worker.enabled_in_serve"),
        ({"completion": {"reopen_failed": "yes"}}, "completion.reopen_failed"),
        ({"node": {"ae_title": 5}}, "node.ae_title"),
        ({"node": {"allowed_calling_aets": "SCANNER"}}, "node.allowed_calling_aets"),
        ({"node": {"allowed_calling_aets": ["OK", 3]}}, "node.allowed_calling_aets[1]"),
        ({"storage": {"root": 3}}, "storage.root"),
        ({"node": "not a table"}, "[node]"),
    ],
)
def test_wrong_type_is_named(data: dict[str, Any], named: str) -> None:
    assert named in _config_error(data)


def test_integer_accepted_for_float_setting() -> None:
    config = _parse({"completion": {"stable_seconds": 5}})
    assert config.completion.stable_seconds == 5.0
    assert isinstance(config.completion.stable_seconds, float)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": -1}}, "node.port"),
        ({"node": {"port": 0}}, "node.port"),
        ({"node": {"host": " "}}, "node.host"),
        ({"node": {"acse_timeout_seconds": 0}}, "node.acse_timeout_seconds"),
        ({"alerts": {"undelivered_after_seconds": 0}}, "alerts.undelivered_after_seconds"),
        ({"alerts": {"undelivered_http_status": 500}}, "alerts.undelivered_http_status"),
        ({"node": {"max_pending_per_address": 0}}, "node.max_pending_per_address"),
        ({"model": {"backend": "tensorrt"}}, "model.backend"),
        ({"worker": {"max_unusable_fraction": 1.0}}, "worker.max_unusable_fraction"),
        ({"worker": {"retry_initial_seconds": 60, "retry_max_seconds": 30}}, "worker.retry_max_seconds"),
        ({"destinations": [{**DESTINATION, "port": 0}]}, "destinations[0].port"),
        ({"output": {"objects": ["sc", "pdf"]}}, "output.objects[1]"),
        ({"output": {"objects": []}}, "output.objects"),
        ({"output": {"objects": ["sr", "sr"]}}, "output.objects"),
        ({"output": {"device_uid": "1.02.3"}}, "output.device_uid"),
        ({"notify": [{"url": "ftp://pager/hook"}]}, "notify[0].url"),
        ({"notify": [{"url": "hooks.example"}]}, "notify[0].url"),
        ({"notify": [{"url": "https://pager/hook", "on": "sometimes"}]}, "notify[0].on"),
        ({"notify": [{"url": "https://pager:99999/hook"}]}, "notify[0].url"),
        ({"notify": [{"url": "https://pager/hook", "format": "html"}]}, "notify[0].format"),
        ({"notify": [{"url": "https://pager/hook", "timeout_seconds": 0}]}, "notify[0].timeout_seconds"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"ae_title": "   "}}, "node.ae_title"),
        ({"node": {"allowed_calling_aets": ["OK", "B" * 17]}}, "node.allowed_calling_aets[1]"),
        ({"triage": {"positive_fraction": -0.5}}, "triage.positive_fraction"),
        ({"triage": {"positive_fraction": 1.5}}, "triage.positive_fraction"),
        ({"triage": {"slice_threshold": 1.0}}, "triage.slice_threshold"),
        ({"triage": {"min_positive_slices": 0}}, "triage.min_positive_slices"),
        ({"completion": {"stable_seconds": 0}}, "completion.stable_seconds"),
        ({"worker": {"stale_after_seconds": 20, "heartbeat_seconds": 10}}, "worker.stale_after_seconds"),
        ({"model": {"device": "tpu"}}, "model.device"),
        ({"explain": {"key_slices": 21}}, "explain.key_slices"),
        ({"explain": {"gradcam_layer": "layer2"}}, "explain.gradcam_layer"),
        ({"output": {"series_number": 0}}, "output.series_number"),
        ({"delivery": {"max_backoff_seconds": 1}}, "delivery.max_backoff_seconds"),
        ({"delivery": {"commitment_timeout_seconds": 0}}, "delivery.commitment_timeout_seconds"),
        ({"destinations": [{**DESTINATION, "commitment": "yes"}]}, "destinations[0].commitment"),
        ({"storage": {"database_url": "node.db"}}, "storage.database_url"),
        ({"destinations": [{**DESTINATION, "port": 70000}]}, "destinations[0].port"),
        ({"destinations": [DESTINATION, {**DESTINATION, "ae_title": "C" * 17}]},
         "destinations[1].ae_title"),
        ({"destinations": [{**DESTINATION, "host": " "}]}, "destinations[0].host"),
        ({"web": {"session_hours": 0}}, "web.session_hours"),
        ({"web": {"session_idle_minutes": -5}}, "web.session_idle_minutes"),
        ({"web": {"max_connections": 0}}, "web.max_connections"),
        ({"web": {"request_timeout_seconds": 0}}, "web.request_timeout_seconds"),
    ],
)
def test_bad_value_is_named(data: dict[str, Any], named: str) -> None:
    assert named in _config_error(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"triage": {"slice_threshold": 1.0}}, "triage.slice_threshold must be in [0, 1), got 1.0"),
        ({"model": {"backend": "tensorrt"}}, "model.backend must be one of auto, torch, onnxruntime, got 'tensorrt'"),
        ({"model": {"device": "tpu"}}, "model.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"alerts": {"undelivered_http_status": 500}}, "alerts.undelivered_http_status must be 200 or 503, got 500"),
        ({"alerts": {"undelivered_after_seconds": -5.0}}, "alerts.undelivered_after_seconds must be > 0, got -5.0"),
        ({"explain": {"gradcam_layer": "layer2"}},
         "explain.gradcam_layer must be one of auto, bifpn_p3, layer4, layer3, got 'layer2'"),
        ({"output": {"kos_for": "positive"}}, "output.kos_for must be one of flagged, all, got 'positive'"),
    ],
)
def test_value_types_check_themselves_once_and_read_well(data: dict[str, Any], message: str) -> None:
    """Rule, backend, device and Grad-CAM layer are parsed into types that check themselves:
    the message comes from there, with the key in front."""
    assert _config_error(data).endswith(message)


def test_parsed_values_have_their_types() -> None:
    config = _parse({"model": {"backend": "torch", "device": "cuda:1"}, "explain": {"gradcam_layer": "layer3"}})
    assert config.model.backend is Backend.TORCH
    assert isinstance(config.model.device, Device) and config.model.device == "cuda:1"
    assert config.explain.gradcam_layer is GradcamLayer.LAYER3
    assert config.triage.source is RuleSource.CHECKPOINT and config.delivery.mode is DeliveryMode.SEND
    assert isinstance(config.triage.configured_rule, TriageRule)
    assert config.output.kos_for is KosFor.FLAGGED
    assert _parse({"output": {"kos_for": "all"}}).output.kos_for is KosFor.ALL


def test_the_rule_in_force_comes_from_where_triage_source_says() -> None:
    recommended = TriageRule(slice_threshold=0.35, positive_fraction=0.02)
    assert _parse({}).triage.rule_for(recommended) == recommended
    own = _parse({"triage": {"source": "config", "slice_threshold": 0.6}}).triage
    assert own.rule_for(recommended) == TriageRule(slice_threshold=0.6)
    assert "from the [triage] keys" in own.describe(recommended)
    # Keys that would be ignored are refused, not silently dropped.
    message = _config_error({"triage": {"slice_threshold": 0.6}})
    assert 'triage.source is "checkpoint", which would ignore them: set source = "config"' in message
    assert "triage.source must be one of checkpoint, config" in _config_error({"triage": {"source": "both"}})


def test_duplicate_destination_names() -> None:
    message = _config_error({"destinations": [DESTINATION, {**DESTINATION, "host": "10.0.0.2"}]})
    assert "destinations" in message
    assert "pacs" in message


def test_destination_missing_key() -> None:
    incomplete = {k: v for k, v in DESTINATION.items() if k != "port"}
    message = _config_error({"destinations": [DESTINATION, incomplete]})
    assert "destinations[1]" in message
    assert "port" in message


def test_destinations_must_be_array_of_tables() -> None:
    assert "destinations" in _config_error({"destinations": DESTINATION})


def test_relative_paths_are_anchored_to_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "node.toml"
    path.write_text(
        '[storage]\nroot = "data/store"\ndatabase_url = "sqlite:///db/node.db"\n'
        '[log]\npath = "logs/triage.log"\n'
        '[model]\ncheckpoint = "models/m.pt"\n'
    )
    config = load_config(path)
    base = folder.resolve()
    assert config.storage.root == base / "data/store"
    assert config.log.path == base / "logs/triage.log"
    assert config.model.checkpoint == base / "models/m.pt"
    assert config.storage.database_url == f"sqlite:///{base}/db/node.db"


def test_default_paths_are_anchored_too(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    config = load_config(path)
    base = tmp_path.resolve()
    assert config.storage.root == base / "var/store"
    assert config.log.path == base / "var/triage.log"
    assert config.storage.database_url == f"sqlite:///{base}/var/node.db"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    data = {
        "storage": {"root": str(elsewhere / "store"),
                    "database_url": f"sqlite:///{elsewhere}/node.db"},
        "log": {"path": str(elsewhere / "triage.log")},
        "model": {"checkpoint": str(elsewhere / "m.pt")},
    }
    config = parse_config(data, tmp_path / "config-folder")
    assert config.storage.root == elsewhere / "store"
    assert config.log.path == elsewhere / "triage.log"
    assert config.model.checkpoint == elsewhere / "m.pt"
    assert config.storage.database_url == f"sqlite:///{elsewhere}/node.db"


def test_non_sqlite_database_url_is_kept() -> None:
    url = "postgresql://ich:secret@db.example/ichnode"
    assert _parse({"storage": {"database_url": url}}).storage.database_url == url


def test_config_path_prefers_explicit_then_env_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from_env = tmp_path / "env.toml"
    monkeypatch.setenv(ENV_VAR, str(from_env))
    assert config_path(None) == from_env
    assert config_path("explicit.toml") == Path("explicit.toml")
    monkeypatch.delenv(ENV_VAR)
    assert config_path(None) == Path("config.toml")


def test_load_config_uses_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[node]\nae_title = "FROMENV"\nport = 104\n')
    monkeypatch.setenv(ENV_VAR, str(path))
    config = load_config()
    assert config.node.ae_title == "FROMENV"
    assert config.node.port == 104
    assert config.source == path


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_validation_error_from_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node]\nprot = 11112\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "node.prot" in str(info.value)


def test_config_is_frozen() -> None:
    config = _parse({})
    with pytest.raises(AttributeError):
        config.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite+pysqlite:///db/node.db", "sqlite+pysqlite:////cfg/db/node.db"),
        ("sqlite:///node.db", "sqlite:////cfg/node.db"),
        ("sqlite:////abs/node.db", "sqlite:////abs/node.db"),
        ("postgresql://user:secret@db/ichnode", "postgresql://user:secret@db/ichnode"),
    ],
)
def test_database_urls_are_anchored_only_when_relative_sqlite_files(url: str, expected: str) -> None:
    from node.config import parse_config

    config = parse_config({"storage": {"database_url": url}}, Path("/cfg"))
    assert config.storage.database_url == expected


def test_abstention_can_be_turned_off_only_in_a_silent_trial() -> None:
    assert _parse({}).triage.abstain is True
    message = _config_error({"triage": {"abstain": False}})
    assert "triage.abstain = false" in message and 'delivery.mode = "silent"' in message
    trial = _parse({"triage": {"abstain": False}, "delivery": {"mode": "silent"}})
    assert trial.triage.abstain is False and trial.silent


# --- paths checked before serve or worker creates anything ----------------------------------


def test_a_copied_config_with_a_wrong_checkpoint_names_the_key_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import subprocess
    import sys

    from demo.peers import free_port

    folder = tmp_path / "etc"
    folder.mkdir()
    text = REPO_CONFIG.read_text().replace("port = 11112", f"port = {free_port()}")
    (folder / "config.toml").write_text(text.replace("port = 8080", f"port = {free_port()}"))
    result = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(folder / "config.toml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert (f"model.checkpoint {folder.resolve()}/models/effclass-synthetic-demo.pt does not exist (relative paths "
            f"are taken from the config file's folder {folder.resolve()})") in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml"]  # no var/: no database, store or log


def _checked(tmp_path: Path, data: dict[str, Any]) -> str:
    from node.config import check_paths

    source = tmp_path / "node.toml"
    with pytest.raises(ConfigError) as info:
        check_paths(parse_config(data, tmp_path, source=source))
    return str(info.value)


def test_paths_that_cannot_be_made_are_named_before_anything_is_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    hint = f"(relative paths are taken from the config file's folder {tmp_path})"
    assert _checked(tmp_path, {"storage": {"root": "file"}}) == f"storage.root {tmp_path}/file is not a folder {hint}"
    assert _checked(tmp_path, {"storage": {"root": "file/store"}}) == (
        f"storage.root {tmp_path}/file/store cannot be created: {tmp_path}/file is not a folder this user may "
        f"write in {hint}")
    assert _checked(tmp_path, {"storage": {"database_url": "sqlite:///file/node.db"}}).startswith(
        f"storage.database_url {tmp_path}/file/node.db cannot be created")
    assert _checked(tmp_path, {"log": {"path": "."}}).startswith(f"log.path {tmp_path} is a folder")
    assert _checked(tmp_path, {"model": {"checkpoint": "."}}) == f"model.checkpoint {tmp_path} is not a file {hint}"
    assert _checked(tmp_path, {"model": {"checkpoint": "/nowhere/m.pt"}}) == "model.checkpoint /nowhere/m.pt does not exist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
