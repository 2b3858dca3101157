"""The web pages in a real browser (Debian's Chromium, headless) against a real node and
a real PACS (Orthanc): a study goes through, the pages show it, and the retry button
brings a delivery that failed while the PACS was down into the PACS once it is up."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom

from tests.conftest import load_labels, require_tool
from tests.peers import Browser, NodeProcess, Orthanc, free_port, node_config, storescu, wait_for

REPO = Path(__file__).resolve().parents[1]
TOKEN = "browser-test-token-0123456789"


def _loaded_images(page) -> list[int]:
    """naturalWidth of every picture on the page: 0 for one that did not load."""
    return page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")


def test_queue_study_and_retry_in_a_browser(tmp_path: Path, positive_study: Path) -> None:
    require_tool("chromium")
    pacs = Orthanc(tmp_path / "orthanc")  # its port is chosen; nothing listens yet
    port, web_port = free_port(), free_port()
    node = NodeProcess(tmp_path, node_config(
        tmp_path, port=port, checkpoint=REPO / "models" / "effclass-synthetic-demo.pt",
        destinations=[("pacs", "PACS", pacs.dicom_port)],
        overrides={"model": {"backend": "torch"}, "explain": {"key_slices": 2},
                   "delivery": {"max_attempts": 1, "timeout_seconds": 3},
                   "web": {"enabled": True, "port": web_port, "token": TOKEN, "refresh_seconds": 0}}), port)
    base = f"http://127.0.0.1:{web_port}"
    labels = load_labels(positive_study)
    uid, accession = labels["study_instance_uid"], labels["accession_number"]
    first = pydicom.dcmread(sorted(positive_study.glob("*/*.dcm"))[0])
    patient = [str(first.PatientName), str(first.PatientID)]
    node.start()
    try:
        assert storescu(port, sorted(positive_study.glob("*/*.dcm"))).returncode == 0

        def deliveries() -> list[str]:
            rows = httpx.get(f"{base}/api/queue", timeout=10).json()["studies"]
            return [d["state"] for row in rows for d in row["deliveries"]]

        wait_for(lambda: deliveries() and all(s == "failed" for s in deliveries()), timeout=300,
                 what="the deliveries to fail while the PACS is down")
        pacs.start()
        with Browser() as page:
            page.goto(base + "/")
            row = page.locator("tr.flagged")
            assert accession in row.inner_text() and "SUSPECTED - PRIORITY" in row.inner_text()
            page.screenshot(path=tmp_path / "queue.png", full_page=True)

            page.click(f"text={accession}")
            page.wait_for_load_state("load")  # every picture fetched
            assert page.url == f"{base}/studies/{uid}"
            timeline = page.locator("table.timeline").inner_text()
            for event in ("received", "ready", "analysed", "delivery_failed"):
                assert event in timeline
            widths = _loaded_images(page)
            assert widths and all(w > 0 for w in widths), widths  # key slices and the P(ICH) curve
            page.screenshot(path=tmp_path / "study.png", full_page=True)

            page.goto(base + "/model")
            assert all(w > 0 for w in _loaded_images(page))
            page.screenshot(path=tmp_path / "model.png", full_page=True)

            page.goto(base + "/failures")
            assert page.locator("text=could not be reached").count() >= 1
            page.screenshot(path=tmp_path / "failures.png", full_page=True)
            page.fill("input[name=token]", TOKEN)
            page.click("text=Retry failed deliveries and notifications")
            page.wait_for_load_state("load")
            assert "Pending again: 3 deliveries" in page.locator("p.notice").inner_text()
            wait_for(lambda: deliveries() and all(s == "sent" for s in deliveries()), timeout=120,
                     what="the retried deliveries to reach the PACS")
            for path in ("/", f"/studies/{uid}", "/failures", "/model"):
                page.goto(base + path)
                for identifier in patient:
                    assert identifier not in page.content(), f"{identifier} on {path}"
        # Only the node sends to this PACS: what it holds is the result (SC, SR and KOS series).
        assert len(pacs.get("/series")) == 3
    finally:
        node.stop()
        pacs.stop()
