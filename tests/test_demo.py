"""`make demo` end to end: storescu → node → Orthanc, pictures written, peers stopped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
from PIL import Image

from tests.conftest import require_tool
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.architectures import create_model

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not yet reaped by its parent is gone for our purposes.
    state = Path(f"/proc/{pid}/stat")
    return state.is_file() and state.read_text().split(")")[-1].split()[0] != "Z"


def _result_images(work: Path) -> dict[str, tuple[int, int]]:
    """The PNG name the demo should write for each Secondary Capture the node sent, and its size."""
    names = {json.loads(labels.read_text())["study_instance_uid"]: labels.parent.name
             for labels in (work / "studies").glob("*/labels.json")}
    images = {}
    for path in (work / "store" / "results").glob("*/*/sc-*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        images[f"{names[ds.StudyInstanceUID]}_{int(ds.InstanceNumber):02d}.png"] = (ds.Columns, ds.Rows)
    return images


def test_demo_runs_the_whole_loop_and_stops_its_peers(tmp_path: Path) -> None:
    require_tool("storescu")
    checkpoint = save_checkpoint(tmp_path / "random.pt", create_model("effclass"), default_model_config("effclass"))
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "demo.run", "--checkpoint", str(checkpoint), "--studies", "2", "--out", str(out),
         "--timeout", "400"],
        check=False, capture_output=True, text=True, timeout=600, cwd=REPO, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the node's web pages: http://127.0.0.1:" in result.stdout
    assert "study_0000" in result.stdout and "study_0001" in result.stdout
    assert "UNTRAINED MODEL" in result.stdout  # the triage log was printed, with the model's warning
    assert result.stdout.count('CODE:(,,"Intracranial hemorrhage (disorder)")') == 2  # each SR, by dsrdump
    assert result.stdout.count("  ICH triage: ") == 2  # each study's notification
    sent = _result_images(out / "work")
    assert sorted(sent) == [f"study_000{s}_0{i}.png" for s in (0, 1) for i in (1, 2, 3, 4)]  # 3 key slices, summary
    assert sorted(p.name for p in out.glob("study_*.png")) == sorted(sent)
    pages = sorted(p.name for p in out.glob("page-*.png"))
    assert pages == ["page-failures.png", "page-model.png", "page-queue.png", "page-study.png"]
    # Each study's series list in the PACS: the scanner's series, then the results leading with the verdict.
    for study in ("study_0000", "study_0001"):
        listing = result.stdout.split(f"{study}: the series list in the PACS\n")[1].split("\n\n")[0]
        assert "CT  HEAD 5mm" in listing and re.search(r"9900  OT  AI ICH: [^\n]*\(UNTRAINED MODEL\)", listing)
        with Image.open(out / f"pacs-{study}.png") as image:
            assert image.format == "PNG" and image.size[0] >= 1280
    for name, size in sent.items():
        with Image.open(out / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", size)
    pids = json.loads((out / "work" / "pids.json").read_text())
    assert not [name for name, pid in pids.items() if _alive(pid)], "the demo left a peer running"


def test_demo_without_a_model_says_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo.run", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 2
    assert "make demo-model" in result.stderr
