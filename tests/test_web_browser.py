"""The web pages in a real browser (Debian's Chromium, headless) against a real node and
a real PACS (Orthanc): a study goes through, the pages show it, and the retry button
brings a delivery that failed while the PACS was down into the PACS once it is up.

While the flagged study's results are undelivered every page carries the red banner and
/readyz says "degraded"; a study sent without an accession number is named by its date,
modality, description and UID end; a wrong token gets the pages' own 403 with a way to
sign in, and signing in there lets the retry through."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file

from tests.conftest import load_labels, require_tool
from tests.peers import Browser, NodeProcess, Orthanc, free_port, node_config, storescu, wait_for

REPO = Path(__file__).resolve().parents[1]
TOKEN = "browser-test-token-0123456789"
PAGES = ("/", "/failures", "/model")


def _loaded_images(page) -> list[int]:
    """naturalWidth of every picture on the page: 0 for one that did not load."""
    return page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")


def _unaccessioned(folder: Path) -> tuple[pydicom.Dataset, Path]:
    """pydicom's real CT slice without an accession number: too few slices to analyse, so it
    is NOT TRIAGED (quickly) and its result waits for the PACS beside the flagged study's."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.AccessionNumber
    ds.StudyDescription = "HEAD <plain>"  # shown escaped
    path = folder / "no-accession.dcm"
    ds.save_as(path)
    return ds, path


def test_queue_study_and_retry_in_a_browser(tmp_path: Path, positive_study: Path) -> None:
    require_tool("chromium")
    pacs = Orthanc(tmp_path / "orthanc")  # its port is chosen; nothing listens yet
    port, web_port = free_port(), free_port()
    checkpoint = tmp_path / "models" / "effclass-synthetic-demo.pt"  # beside the config: shown relative to it
    checkpoint.parent.mkdir()
    checkpoint.symlink_to(REPO / "models" / "effclass-synthetic-demo.pt")
    node = NodeProcess(tmp_path, node_config(
        tmp_path, port=port, checkpoint=checkpoint,
        destinations=[("pacs", "PACS", pacs.dicom_port)],
        overrides={"model": {"backend": "torch"}, "explain": {"key_slices": 2},
                   "delivery": {"max_attempts": 1, "timeout_seconds": 3},
                   "web": {"enabled": True, "port": web_port, "token": TOKEN, "refresh_seconds": 0}}), port)
    base = f"http://127.0.0.1:{web_port}"
    labels = load_labels(positive_study)
    uid, accession = labels["study_instance_uid"], labels["accession_number"]
    first = pydicom.dcmread(sorted(positive_study.glob("*/*.dcm"))[0])
    other, other_file = _unaccessioned(tmp_path)
    patient = [str(first.PatientName), str(first.PatientID), str(other.PatientName)]
    other_name = f"2004-01-19 · CT · HEAD &lt;plain&gt; · …{other.StudyInstanceUID[-12:]}"
    node.start()
    try:
        assert storescu(port, sorted(positive_study.glob("*/*.dcm"))).returncode == 0
        assert storescu(port, [other_file]).returncode == 0

        def queue() -> list[dict]:
            return httpx.get(f"{base}/api/queue", timeout=10).json()["studies"]

        def deliveries() -> list[str]:
            return [d["state"] for row in queue() for d in row["deliveries"]]

        wait_for(lambda: (rows := queue()) and len(rows) == 2 and all(r["state"] in ("done", "failed") for r in rows)
                 and all(s == "failed" for s in deliveries()), timeout=300,
                 what="both studies to finish and their deliveries to fail while the PACS is down")
        failed = len(deliveries())
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["degraded"] == ["deliveries"] and uid not in ready.text
        pacs.start()
        with Browser() as page:
            page.goto(base + "/")
            banner = page.locator(".banner.undelivered")
            assert banner.is_visible() and "1 flagged study" in banner.inner_text() and accession in banner.inner_text()
            assert banner.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(176, 58, 46)"  # red
            row = page.locator("tr.flagged")
            assert accession in row.inner_text() and "SUSPECTED - PRIORITY" in row.inner_text()
            assert "results not delivered" in row.inner_text()
            assert other_name in page.content() and "(none)" not in page.content()
            page.screenshot(path=tmp_path / "queue.png", full_page=True)

            page.click(f"text={accession}")
            page.wait_for_load_state("load")  # every picture fetched
            assert page.url == f"{base}/studies/{uid}"
            assert page.locator(".banner.undelivered").is_visible()
            timeline = page.locator("table.timeline").inner_text()
            for event in ("received", "ready", "analysed", "delivery_failed"):
                assert event in timeline
            widths = _loaded_images(page)
            assert widths and all(w > 0 for w in widths), widths  # key slices and the P(ICH) curve
            page.screenshot(path=tmp_path / "study.png", full_page=True)

            page.goto(f"{base}/studies/{other.StudyInstanceUID}")
            assert other_name in page.locator("h1").inner_html()

            page.goto(base + "/model")
            assert all(w > 0 for w in _loaded_images(page))
            assert page.locator(".banner.undelivered").is_visible()
            text = page.locator("main").inner_text()
            assert "models/effclass-synthetic-demo.pt" in text and str(tmp_path) not in text
            assert "In the window: 2 studies ended, 2 analysed (1 given a verdict, 1 of them flagged; " \
                   "1 not triaged) and 0 failed." in text
            assert "val_roc_auc: 0.982" in text  # not 0.98154…
            page.screenshot(path=tmp_path / "model.png", full_page=True)

            page.goto(base + "/failures")
            assert page.locator("text=could not be reached").count() >= 1
            flagged = page.locator("tr.flagged")
            assert flagged.count() == 3 and all("SUSPECTED - PRIORITY" in t for t in flagged.all_inner_texts())
            assert other_name in page.content()
            page.screenshot(path=tmp_path / "failures.png", full_page=True)
            page.fill("input[name=token]", "not-the-token-at-all")
            page.click("text=Retry failed deliveries and notifications")
            page.wait_for_load_state("load")
            assert page.locator("h1").inner_text() == "Not allowed" and "wrong token" in page.content()
            assert page.locator("header nav").is_visible()  # the pages' own look, with the way back
            page.screenshot(path=tmp_path / "refused.png", full_page=True)
            page.click("main >> text=Sign in")
            page.fill("input[name=token]", TOKEN)
            page.click("button:has-text('Sign in')")
            page.wait_for_load_state("load")
            assert page.url == base + "/failures"
            page.click("text=Retry failed deliveries and notifications")  # signed in: no token to type
            page.wait_for_load_state("load")
            assert f"Pending again: {failed} deliveries" in page.locator("p.notice").inner_text()
            wait_for(lambda: deliveries() and all(s == "sent" for s in deliveries()), timeout=120,
                     what="the retried deliveries to reach the PACS")
            for path in (*PAGES, f"/studies/{uid}"):
                page.goto(base + path)
                assert page.locator(".banner.undelivered").count() == 0, path
                for identifier in patient:
                    assert identifier not in page.content(), f"{identifier} on {path}"
        assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
        # Only the node sends to this PACS: what it holds is the two studies' results (SC, SR
        # and KOS series), one series per delivery.
        assert len(pacs.get("/series")) == failed
    finally:
        node.stop()
        pacs.stop()
