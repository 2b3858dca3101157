"""A failed study can be re-run, end to end: `ichnode reanalyse` against a running node,
and a re-send with `completion.reopen_failed`. A node without a model fails every study
it analyses (the reason names model.checkpoint): the cheapest real failure, and each
re-run shows as one more `failed` event. The states and the web buttons are tested in
tests/test_state.py, tests/test_cli.py and tests/test_web.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from node.triagelog import read_events
from tests.conftest import load_labels
from tests.peers import NodeProcess, free_port, node_config, storescu, wait_for


def _reanalyse(node: NodeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "reanalyse", *args, "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=120)


def test_a_failed_study_is_re_run_by_reanalyse_and_by_a_re_send_with_reopen_failed(
        tmp_path: Path, negative_study: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, stable_seconds=1,
                                             overrides={"completion": {"reopen_failed": True}}), port)
    uid = load_labels(negative_study)["study_instance_uid"]
    image = sorted((negative_study / "HEAD").glob("*.dcm"))[:1]  # one file: the study is quiet at once

    def events() -> list[dict]:
        return [e for e in read_events(tmp_path / "triage.log") if e["study_instance_uid"] == uid]

    def failures(count: int) -> None:
        wait_for(lambda: sum(e["event"] == "failed" for e in events()) == count, timeout=60,
                 what=f"failed event number {count}")

    node.start()
    try:
        assert storescu(port, image).returncode == 0
        failures(1)
        by_uid = _reanalyse(node, uid)
        assert by_uid.returncode == 0, by_uid.stderr
        assert f"study {uid} (accession " in by_uid.stdout and "failed, queued to be analysed again" in by_uid.stdout
        failures(2)
        every = _reanalyse(node, "--failed")
        assert every.returncode == 0 and "failed, queued to be analysed again" in every.stdout, every.stderr
        failures(3)
        assert storescu(port, image).returncode == 0  # sent before: only reopen_failed makes it re-open the study
        failures(4)
    finally:
        node.stop()
    assert [e["event"] for e in events()] == ["received", "ready", "failed", "reanalyse", "failed", "reanalyse",
                                              "failed", "received", "ready", "failed"]
    assert {e["reason"] for e in events() if e["event"] == "failed"} == {
        "no model checkpoint configured (model.checkpoint)"}
    assert [e["by"] for e in events() if e["event"] == "reanalyse"] == ["cli", "cli"]
    assert "re-opened by an instance sent again (completion.reopen_failed)" in events()[7]["note"]
