"""Whatever arrives, the node answers with a specific status or logs what was wrong, stays
up, and analyses what can be analysed (corpus: tests/badinput.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from pynetdicom import AE

from node.triagelog import read_events
from tests.badinput import build_corpus
from tests.peers import NodeProcess, echoscu, free_port, node_config, storescu, wait_for
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.scope import Scope
from training.model.architectures import create_model


def _send_raw(port: int, path: Path) -> int | None:
    """Send a file's dataset bytes as they are, undecoded (pynetdicom's chunked mode)."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return getattr(status, "Status", None)
    finally:
        if assoc.is_established:
            assoc.release()


def test_the_bad_input_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    cases, raw = build_corpus(tmp_path / "corpus")
    torch.manual_seed(0)
    # Its scope admits the corpus's 16-slice studies (64-80 mm): this test is about bad input.
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"),
                                 dataclasses.replace(default_model_config("resnet18"), scope=Scope(min_coverage_mm=0)))
    port = free_port()
    # The messy study loses 3 of its 16 slices: more than the default 10 % that fails a
    # study (tests/test_analysis.py), so this node accepts a quarter to show each one named.
    config = node_config(tmp_path, port=port, checkpoint=checkpoint, stable_seconds=1,
                         overrides={"worker": {"max_unusable_fraction": 0.25}})
    node = NodeProcess(tmp_path, config, port)
    node.start()
    try:
        for case in cases:
            if case.files:
                sent = storescu(port, case.files, extra=case.storescu_args)
                assert sent.returncode == 0, f"{case.name}: {sent.stderr[-500:]}"
        assert _send_raw(port, raw["truncated"]) == 0x0000  # identifiers intact: stored as sent
        assert _send_raw(port, raw["garbage"]) in (0xA900, 0xC210)
        assert echoscu(port).returncode == 0  # still up

        def outcome(uid: str) -> dict | None:
            for event in read_events(tmp_path / "triage.log"):
                if event["study_instance_uid"] == uid and event["event"] in ("analysed", "failed"):
                    return event
            return None

        results = {case.name: wait_for(lambda c=case: outcome(c.study_uid), timeout=300,
                                       what=f"the outcome of {case.name}") for case in cases}
    finally:
        node.stop()
    for case in cases:
        event = results[case.name]
        if case.failure:
            assert event["event"] == "failed" and case.failure in event["reason"], (case.name, event)
            continue
        assert event["event"] == "analysed", f"{case.name}: {event.get('reason')}"
        assert len(event["skipped_slices"]) == case.skipped, (case.name, event["skipped_slices"])
        reasons = " ".join(event["passed_over"].values())
        assert all(word in reasons for word in case.passed_over), (case.name, reasons)
        assert event["slice_order"] == case.slice_order, case.name
    # Reused SOPInstanceUIDs: each study analysed all 16 of its own slices.
    assert results["reused_uids"]["total_slices"] == results["mono1_tilt"]["total_slices"] == 16
    messy = results["messy"]["skipped_slices"].values()
    assert any("no PixelData" in why for why in messy)
    assert any("SamplesPerPixel 3" in why for why in messy)
    assert any("PixelData holds" in why and "× BitsAllocated" in why for why in messy)
    output = node.output()
    assert "could not be decoded" in output or "refused" in output  # the garbage, in the log
    assert "Traceback" not in output
