"""`make demo`: the whole loop on loopback, with real peers.

Synthetic studies (with scout and bone series) go from DCMTK `storescu`, as the scanner,
to the node; the node's results (pictures, SR, key slices) go to an Orthanc PACS and its
notifications to a webhook on loopback; the demo then prints the triage log, each SR as
DCMTK `dsrdump` shows it, the notifications' text, compares each verdict with the
phantom's truth, writes PNG renderings of the Secondary Captures the PACS received and
screenshots of the node's web pages (taken by headless Chromium), leaves the pages up
until Enter is pressed when run from a terminal, and stops everything it started.
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from demo.peers import Browser, NodeProcess, Orthanc, WebhookReceiver, find_tool, free_port, wait_for
from node.config import load_config
from node.errors import IchNodeError
from node.triagelog import read_events
from training.synthetic import StudyLabels, SyntheticOptions, write_studies

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
# Not the demo model's training (1) or held-out (2) seed: these studies are new to it.
DEMO_SEED = 3
RESULT_PREFIX = "AI ICH:"  # every result series' description; the pictures are the OT one


@dataclass(frozen=True)
class Outcome:
    """One study: its truth, what the node said, and the pictures the PACS got."""

    name: str
    labels: StudyLabels
    study_uid: str
    analysed: dict | None
    pictures: list[Path]


def _toml(value: object) -> str:
    return json.dumps(str(value))  # a TOML basic string: JSON escapes are valid TOML


@dataclass(frozen=True)
class Web:
    """Where the demo node serves its pages, and the token its retry button needs."""

    port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def node_config_text(work: Path, port: int, checkpoint: Path, pacs: Orthanc, webhook: str, web: Web) -> str:
    """A node on loopback that analyses with `checkpoint`, sends its results to `pacs`,
    tells `webhook` about every study and serves its pages at `web`."""
    return f"""# Written by `make demo`.
[node]
ae_title = "ICHNODE"
host = "127.0.0.1"
port = {port}
[storage]
root = {_toml(work / "store")}
database_url = {_toml("sqlite:///" + str(work / "node.db"))}
[completion]
stable_seconds = 3
check_interval_seconds = 0.5
[worker]
poll_seconds = 0.5
[model]
checkpoint = {_toml(checkpoint)}
device = "cpu"
[delivery]
initial_backoff_seconds = 2
max_backoff_seconds = 10
[log]
path = {_toml(work / "triage.log")}
[web]
host = "127.0.0.1"
port = {web.port}
token = {_toml(web.token)}
refresh_seconds = 5
[[destinations]]
name = "pacs"
ae_title = {_toml(pacs.ae_title)}
host = "127.0.0.1"
port = {pacs.dicom_port}
[[notify]]
url = {_toml(webhook)}
on = "all"
"""


def _default_checkpoint() -> Path | None:
    """The model `make run` would use: model.checkpoint of the repository's config.toml."""
    try:
        return load_config(REPO / "config.toml").model.checkpoint
    except IchNodeError as exc:
        print(f"cannot read config.toml for its model.checkpoint: {exc}", file=sys.stderr)
        return None


def _send(port: int, study: Path, called: str = "ICHNODE") -> None:
    """Every file of the study (head, bone and scout series) in one association, as a scanner."""
    result = subprocess.run(
        [find_tool("storescu"), "-aet", "SCANNER", "-aec", called, "127.0.0.1", str(port),
         *map(str, sorted(study.rglob("*.dcm")))], check=False, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"storescu could not send {study.name}: {result.stderr.strip()[-1000:]}")


def _unsettled(log_path: Path, uids: set[str]) -> set[str]:
    """The studies whose story has not ended: not every object set of its result delivered
    (a study not flagged has no KOS), and no failure or delivery given up."""
    delivered: dict[str, set[str]] = {}
    expected: dict[str, set[str]] = {}
    ended = set()
    for event in read_events(log_path):
        uid = event["study_instance_uid"]
        if event["event"] == "delivered":
            delivered.setdefault(uid, set()).add(event.get("kind", ""))
        if event["event"] == "analysed":
            expected[uid] = set(event.get("result_sets", {}))
        if event["event"] == "failed" or (event["event"] == "delivery_failed" and event.get("final")):
            ended.add(uid)
    return uids - ended - {uid for uid, kinds in delivered.items() if uid in expected and kinds >= expected[uid]}


def _analysed(log_path: Path) -> dict[str, dict]:
    """The last `analysed` event of each study."""
    return {e["study_instance_uid"]: e for e in read_events(log_path) if e["event"] == "analysed"}


def _wait_for_results(node: NodeProcess, log_path: Path, uids: dict[str, str], timeout: float) -> None:
    """Poll the triage log until every study settles; on timeout name the missing ones."""
    try:
        wait_for(lambda: not _unsettled(log_path, set(uids.values())), timeout=timeout,
                 what="every study's result", every=1.0)
    except TimeoutError as exc:
        missing = _unsettled(log_path, set(uids.values()))
        names = ", ".join(name for name, uid in uids.items() if uid in missing)
        raise RuntimeError(f"{exc}; no result yet for {names}; the node's output ends with:\n"
                           f"{node.output()[-3000:]}") from None


def _save_pictures(pacs: Orthanc, study_uid: str, name: str, out: Path) -> list[Path]:
    """PNGs of the result series the PACS holds for this study."""
    paths = []
    for study in pacs.get("/studies?expand"):
        if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
            continue
        for series_id in study["Series"]:
            series = pacs.get(f"/series/{series_id}")
            tags = series["MainDicomTags"]
            if tags.get("Modality") != "OT" or not tags.get("SeriesDescription", "").startswith(RESULT_PREFIX):
                continue
            for instance_id in series["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{instance_id}/file")))
                path = out / f"{name}_{int(ds.InstanceNumber):02d}.png"
                Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8)).save(path)
                paths.append(path)
    return sorted(paths)


def _print_reports(pacs: Orthanc, out: Path) -> None:
    """Each SR the PACS holds, as DCMTK's dsrdump shows it."""
    for series in pacs.get("/series?expand"):
        if series["MainDicomTags"].get("Modality") != "SR":
            continue
        for instance_id in series["Instances"]:
            path = out / f"report_{instance_id[:8]}.dcm"
            path.write_bytes(pacs.get_bytes(f"/instances/{instance_id}/file"))
            dump = subprocess.run([find_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
            print(f"\nSR in the PACS (`dsrdump`):\n{dump.stdout.strip()}", flush=True)


def _summary(outcomes: list[Outcome]) -> str:
    lines = ["", "study        truth                                   node verdict"]
    for o in outcomes:
        truth = ("ICH: " + ", ".join(o.labels.subtypes)) if o.labels.positive else "no ICH"
        if o.analysed is None:
            verdict = "not analysed (see the triage log)"
        else:
            flag = "SUSPECTED ICH - PRIORITY" if o.analysed["positive"] else "ICH not detected"
            verdict = (f"{flag} ({o.analysed['positive_slices']}/{o.analysed['total_slices']} slices, "
                       f"max P(ICH) {o.analysed['study_score']:.3f})")
        lines.append(f"{o.name:<12} {truth:<39} {verdict}")
    return "\n".join(lines)


def _series_lists(pacs: Orthanc, uids: dict[str, str]) -> dict[str, str]:
    """Each study's series as the PACS lists them (number and description), printed; the
    PACS's own id of each study, for its viewer's page."""
    ids = {}
    by_uid = {s["MainDicomTags"].get("StudyInstanceUID"): s for s in pacs.get("/studies?expand")}
    for name, uid in uids.items():
        study = by_uid.get(uid)
        if study is None:
            continue
        ids[name] = study["ID"]
        print(f"\n{name}: the series list in the PACS", flush=True)
        series = [pacs.get(f"/series/{series_id}")["MainDicomTags"] for series_id in study["Series"]]
        for tags in sorted(series, key=lambda t: int(t.get("SeriesNumber") or 0)):
            print(f"  {tags.get('SeriesNumber', ''):>5}  {tags.get('Modality', ''):<3} "
                  f"{tags.get('SeriesDescription', '')}", flush=True)
    return ids


def _pacs_screenshot(pacs: Orthanc, study_id: str, path: Path) -> Path:
    """The study's series list in the PACS's own viewer (Orthanc Explorer), as a reader sees it."""
    with Browser(height=700) as page:
        page.goto(f"http://127.0.0.1:{pacs.http_port}/app/explorer.html#study?uuid={study_id}")
        page.wait_for_selector("text=AI ICH:", timeout=30_000)
        page.screenshot(path=path, full_page=True)
    return path


PAGES = ("queue", "study", "failures", "model")


def _screenshots(web: Web, study_uid: str, out: Path) -> list[Path]:
    """Each web page as a browser shows it (the study page of `study_uid`)."""
    paths = []
    with Browser() as page:
        for name, path in zip(PAGES, ("", f"studies/{study_uid}", "failures", "model")):
            page.goto(web.url + path)
            paths.append(out / f"page-{name}.png")
            page.screenshot(path=paths[-1], full_page=True)
    return paths


def _show_pages(web: Web, keep_open: bool) -> None:
    print(f"\nthe node's web pages: {web.url} (admin token for the retry button: {web.token})", flush=True)
    if keep_open:
        try:
            input("the node, the PACS and the pages stay up until you press Enter ... ")
        except EOFError:  # stdin closed: nobody is there to press it
            pass


def run(checkpoint: Path, studies: int, out: Path, timeout: float, keep_open: bool = False) -> list[Outcome]:
    """The demo itself; peers are stopped whatever happens."""
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for old in out.glob("*.png"):
        old.unlink()
    print(f"writing {studies} synthetic studies (seed {DEMO_SEED}, with scout and bone series) ...", flush=True)
    labels = write_studies(work / "studies", SyntheticOptions(studies=studies, seed=DEMO_SEED, localizer=True,
                                                              bone_series=True))
    uids = {s.folder.name: json.loads((s.folder / "labels.json").read_text())["study_instance_uid"] for s in labels}
    pacs = Orthanc(work / "pacs")
    webhook = WebhookReceiver()
    node: NodeProcess | None = None
    try:
        print("starting an Orthanc PACS, a webhook receiver and the node on loopback ...", flush=True)
        pacs.start()
        webhook.start()
        port = free_port()
        web = Web(free_port(), secrets.token_hex(16))
        node = NodeProcess(work, node_config_text(work, port, checkpoint, pacs, webhook.url, web), port)
        node.start(wait=False)  # assigned first, so the finally stops a node that never listens
        (work / "pids.json").write_text(json.dumps({"node": node.process.pid, "orthanc": pacs.process.pid}))
        node.wait_listening()
        for study in labels:
            print(f"storescu → node and PACS: {study.folder.name}", flush=True)
            _send(port, study.folder)
            _send(pacs.dicom_port, study.folder, pacs.ae_title)  # the scanner's series are in the PACS too
        print(f"waiting up to {timeout:.0f} s for the node to analyse and deliver every study ...", flush=True)
        _wait_for_results(node, work / "triage.log", uids, timeout)
        analysed = _analysed(work / "triage.log")
        wait_for(lambda: len(webhook.received) >= len(analysed), timeout=60, what="a notification per study")
        print("\ntriage log (`ichnode log`):", flush=True)
        subprocess.run([sys.executable, "-m", "node.cli", "log", "--config", str(node.config_path)],
                       check=False, timeout=60)
        _print_reports(pacs, work)
        print("\nnotifications the webhook received (their `text` line):", flush=True)
        for message in webhook.received:
            print(f"  {message['text']}", flush=True)
        outcomes = [Outcome(s.folder.name, s, uids[s.folder.name], analysed.get(uids[s.folder.name]),
                            _save_pictures(pacs, uids[s.folder.name], s.folder.name, out)) for s in labels]
        pacs_ids = _series_lists(pacs, uids)
        flagged = [o.study_uid for o in outcomes if o.analysed and o.analysed["positive"]]
        pages = _screenshots(web, (flagged or [outcomes[0].study_uid])[0], out)
        pages += [_pacs_screenshot(pacs, pacs_ids[o.name], out / f"pacs-{o.name}.png") for o in outcomes
                  if o.name in pacs_ids]
        print("\nscreenshots of the web pages and the PACS's series lists (headless Chromium):", *(f"  {p}" for p in pages), sep="\n", flush=True)
        _show_pages(web, keep_open)
        return outcomes
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
        webhook.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="model to demonstrate (default: model.checkpoint "
                                                        "of config.toml, the demonstration model)")
    parser.add_argument("--studies", type=int, default=4, help="synthetic studies to send, half with bleeds")
    parser.add_argument("--out", type=Path, default=REPO / "var" / "demo", help="folder for the PNGs")
    parser.add_argument("--timeout", type=float, default=480, help="seconds to wait for the results")
    parser.add_argument("--keep-open", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="leave the node and its web pages up until Enter is pressed "
                             "(default: when run from a terminal)")
    args = parser.parse_args(argv)
    # `kill` or a CI timeout sends SIGTERM: leave through the finally that stops the peers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    checkpoint = args.checkpoint or _default_checkpoint()
    if checkpoint is None or not checkpoint.is_file():
        print(f"no model to demonstrate ({checkpoint or 'model.checkpoint is empty'}): run `make demo-model` "
              "or pass --checkpoint", file=sys.stderr)
        return 2
    try:
        outcomes = run(checkpoint.resolve(), args.studies, args.out.resolve(), args.timeout, args.keep_open)
    except (IchNodeError, OSError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(_summary(outcomes))
    pictures = [p for o in outcomes for p in o.pictures]
    print(f"\n{len(pictures)} pictures of the results the PACS received, in {args.out}:")
    for path in pictures:
        print(f"  {path}")
    missing = [o.name for o in outcomes if not o.pictures]
    if missing:
        print(f"demo failed: no result series reached the PACS for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
