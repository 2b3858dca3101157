"""`make bench`: every stage against a reference measured in the same run, as ratios.

- ingest: the same synthetic 512² slices sent by DCMTK storescu (1 and 4 associations)
  into the node (durable: fsync + database row before Success), DCMTK storescp and Orthanc;
- inference: slices/s of the node's inference path against eager PyTorch fp32;
- Grad-CAM of 3 key slices: the node's split path (from the inference pass's features)
  against pytorch-grad-cam differentiating the whole network, as before;
- end to end: last instance of a 32-slice study in → Secondary Capture stored in Orthanc,
  split by stage;
- peak memory (VmHWM) of the node process in each run;
- monitoring: the web pages' and /metrics' reading of a year's triage log (the first read
  after start, a scrape after 100 new events, one study's timeline) against parsing every
  line with json.loads;
- scaling: images/s per `serve` process on SQLite and on PostgreSQL (a throw-away cluster,
  fsync on), and of two `serve` processes sharing one PostgreSQL database, against DCMTK
  storescp in the same run; studies/hour of one and of two CPU `worker` processes
  (EffClass) sharing the queue;
- STOW-RS: images/s of DICOMweb STOW-RS into the node (dicomweb-client, one request per
  STOW_BATCH instances) beside DCMTK storescu (C-STORE, one association) into the node,
  against Orthanc's own STOW-RS (its DICOMweb plugin) in the same run.

Loopback only; every wait is bounded. Results go to stdout and bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import torch

import requests
from dicomweb_client import DICOMwebClient

from demo.peers import NodeProcess, Orthanc, PostgresCluster, free_port, node_config, port_open, wait_for
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.architectures import create_model, gradcam_module
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device
from training.synthetic import SyntheticOptions, write_studies


def _send(port: int, called: str, files: list[Path], associations: int) -> float:
    """Seconds for `associations` parallel storescu processes to send `files`."""
    groups = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(lambda group: subprocess.run(
            ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, group)],
            capture_output=True, text=True, timeout=600), groups))
    elapsed = time.perf_counter() - start
    failed = [r.stderr[-300:] for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0]}")
    return elapsed


def bench_ingest(work: Path, files: list[Path]) -> dict:
    results: dict[str, dict] = {}
    for associations in (1, 4):
        run = work / f"ingest{associations}"
        # The node: no model, a long quiet time, so only ingest is measured.
        port = free_port()
        (run / "node").mkdir(parents=True)
        node = NodeProcess(run / "node", node_config(run / "node", port=port, checkpoint=None,
                                                     stable_seconds=3600), port).start()
        try:
            seconds = _send(port, "ICHNODE", files, associations)
            stored = len(list((run / "node" / "store").rglob("*.dcm")))
            memory = node.peak_memory_mb()
        finally:
            node.stop()
        results.setdefault("node", {})[associations] = {
            "images_per_s": len(files) / seconds, "stored": stored, "peak_memory_mb": memory}
        # DCMTK storescp, one process per association (--fork), no fsync.
        port = free_port()
        (run / "storescp").mkdir()
        scp = subprocess.Popen(["storescp", "--fork", "-od", str(run / "storescp"), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda port=port: port_open(port), timeout=30, what="storescp")
            seconds = _send(port, "ANY-SCP", files, associations)
        finally:
            scp.terminate()
            scp.wait(timeout=30)
        results.setdefault("storescp", {})[associations] = {"images_per_s": len(files) / seconds}
        orthanc = Orthanc(run / "orthanc").start()
        try:
            seconds = _send(orthanc.dicom_port, "PACS", files, associations)
        finally:
            orthanc.stop()
        results.setdefault("orthanc", {})[associations] = {"images_per_s": len(files) / seconds}
    return results


def _best_seconds(run, repeats: int) -> float:
    """The best of several runs: the one least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def bench_inference(slices: list, batches: tuple[int, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model("effclass").eval()
    config = default_model_config("effclass")
    eager = Predictor(model, config, device=Device("cpu"), backend=Backend.TORCH)
    node_path = Predictor(model, config, device=Device("cpu"), backend=Backend.AUTO)
    inputs = eager.prepare(slices)
    results = {"node_backend": node_path.forward.name, "slices": len(inputs), "batches": {}}
    for batch in batches:
        timings = {}
        for name, predictor in (("eager_fp32", eager), ("node", node_path)):
            predictor.batch_size = batch
            predictor.predict(inputs[:batch])  # warm-up
            timings[name] = len(inputs) / _best_seconds(lambda p=predictor: p.predict(inputs), repeats)
            timings[f"{name}_probabilities"] = predictor.predict(inputs)
        difference = float(np.abs(timings.pop("eager_fp32_probabilities") - timings.pop("node_probabilities")).max())
        results["batches"][batch] = {**timings, "ratio": timings["node"] / timings["eager_fp32"],
                                     "max_probability_difference": difference}
    return results


def bench_gradcam(slices: list, repeats: int) -> dict:
    """Seconds for Grad-CAM of 3 key slices at EffClass's default layer, both ways."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_model("effclass").eval()
    predictor = Predictor(model, default_model_config("effclass"), device=Device("cpu"), backend=Backend.AUTO)
    inputs = predictor.prepare(slices[:3])
    _, features = predictor.predict_with_features(inputs)
    layer = gradcam_module(model, predictor.gradcam_layer)

    def full_network() -> np.ndarray:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=torch.from_numpy(inputs), targets=[ClassifierOutputTarget(1)] * len(inputs))

    old = _best_seconds(full_network, repeats)
    new = _best_seconds(lambda: predictor.gradcam_from_features(features), repeats)
    from_inputs = _best_seconds(lambda: predictor.gradcam(inputs), repeats)
    difference = float(np.abs(full_network() - predictor.gradcam(inputs)).max())
    return {"layer": str(predictor.gradcam_layer), "key_slices": len(inputs), "full_network_s": old,
            "split_from_features_s": new, "split_from_inputs_s": from_inputs, "ratio": old / new,
            "max_map_difference": difference}


def bench_end_to_end(work: Path, study: Path) -> dict:
    run = work / "e2e"
    run.mkdir()
    torch.manual_seed(0)
    checkpoint = save_checkpoint(run / "effclass.pt", create_model("effclass"), default_model_config("effclass"))
    orthanc = Orthanc(run / "orthanc").start()
    port = free_port()
    node = NodeProcess(run, node_config(run, port=port, checkpoint=checkpoint, stable_seconds=1,
                                        destinations=[("pacs", "PACS", orthanc.dicom_port)]), port).start()
    try:
        files = sorted((study / "HEAD").glob("*.dcm"))
        _send(port, "ICHNODE", files, 1)
        last_instance = time.time()

        def arrived() -> bool:
            return any(s["MainDicomTags"].get("SeriesDescription", "").startswith("AI ICH TRIAGE")
                       for s in orthanc.get("/series?expand"))

        wait_for(arrived, timeout=600, what="the result series in Orthanc", every=0.05)
        total = time.time() - last_instance
        memory = node.peak_memory_mb()
        events = {e["event"]: e for e in map(json.loads, (run / "triage.log").read_text().splitlines())}
    finally:
        node.stop()
        orthanc.stop()

    def stamp(event: str) -> float:
        from datetime import datetime
        return datetime.fromisoformat(events[event]["time"]).timestamp()

    stages = {"wait (stable_seconds + poll)": stamp("ready") - last_instance}
    stages.update({k: v for k, v in events["analysed"]["timings_s"].items()})
    stages["send (C-STORE to Orthanc)"] = max(0.0, total - (stamp("analysed") - last_instance))
    return {"slices": len(files), "total_s": total, "excluding_wait_s": total - stages["wait (stable_seconds + poll)"],
            "stages_s": stages, "peak_memory_mb": memory}


def _year_of_log(path: Path, studies: int) -> str:
    """A triage log as a busy site writes it in a year: 8 events per study, the analysed
    event as the node writes it. Returns one study's UID."""
    analysed = {"verdict": "AI ICH TRIAGE: not detected", "positive": False, "study_score": 0.12,
                "top_k_score": 0.08, "positive_slices": 0, "total_slices": 32, "required_slices": 2,
                "slice_threshold": 0.8, "series_reason": "axial CT, 32 slices, soft-tissue kernel, 5.0 mm",
                "slice_order": "position along the slice normal", "skipped_slices": {},
                "passed_over": {"1.2.3.4.5.6.7.8.9": "a localizer (scout)"}, "result_objects": 6,
                "result_sets": {"sc": 4, "sr": 1, "kos": 1}, "model": "effclass", "model_training_data": "rsna",
                "warnings": [], "timings_s": {"load": 0.02, "preprocess": 0.05, "inference": 3.9, "gradcam": 0.4,
                                              "encode": 0.1}}
    start = time.time() - 365 * 86400
    with open(path, "w") as handle:
        for i in range(studies):
            uid = f"1.2.826.0.1.3680043.8.498.{i}"
            when = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(start + i * 365 * 86400 / studies))
            events = [("received", {"calling_aet": "SCANNER", "note": "new study"}),
                      ("ready", {"instances": 97, "series": 3}),
                      ("analysed", {**analysed, "positive": i % 10 == 0, "study_score": (i % 100) / 100}),
                      *(("delivered", {"destination": "pacs", "kind": k, "objects": 1}) for k in ("sc", "sr", "kos")),
                      ("notified", {"url": "https://chat.example.org/…"}), ("purged", {"instances": 97})]
            for event, fields in events:
                handle.write(json.dumps({"time": when, "event": event, "study_instance_uid": uid,
                                         "accession_number": f"A{i:08d}", **fields}) + "\n")
    return f"1.2.826.0.1.3680043.8.498.{studies // 2}"


def bench_monitoring(work: Path, studies: int = 36500) -> dict:
    """What the web pages and /metrics pay to read the triage log (100 studies a day for a year)."""
    from node.history import TriageHistory
    from node.triagelog import LogReader, TriageLog

    path = work / "year.log"
    uid = _year_of_log(path, studies)

    def parse_every_line() -> None:
        with open(path, "rb") as handle:
            for line in handle:
                json.loads(line)

    reference = _best_seconds(parse_every_line, 3)
    first = _best_seconds(lambda: TriageHistory(path, days=30).refresh(), 3)
    history = TriageHistory(path, days=30)
    history.refresh()
    log = TriageLog(path)
    for i in range(100):
        log.write("ready", f"9.9.{i}", instances=1, series=1)
    start = time.perf_counter()
    snapshot = history.refresh()
    scrape = time.perf_counter() - start
    timeline = _best_seconds(lambda: LogReader(path).read_study(uid), 3)
    return {"studies": studies, "lines": sum(snapshot.events.values()), "megabytes": path.stat().st_size / 2**20,
            "parse_every_line_s": reference, "first_read_s": first, "after_100_new_events_s": scrape,
            "one_study_timeline_s": timeline, "first_read_ratio": first / reference,
            "timeline_ratio": timeline / reference}


def _storescp_images_per_s(work: Path, files: list[Path], associations: int) -> float:
    port = free_port()
    work.mkdir(parents=True)
    scp = subprocess.Popen(["storescp", "--fork", "-od", str(work), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=30, what="storescp")
        return len(files) / _send(port, "ANY-SCP", files, associations)
    finally:
        scp.terminate()
        scp.wait(timeout=30)


def _serve_for_ingest(folder: Path, database_url: str) -> NodeProcess:
    """A scanner-facing serve process that only stores: no model, no worker, a long quiet time."""
    port = free_port()
    folder.mkdir(parents=True)
    return NodeProcess(folder, node_config(folder, port=port, checkpoint=None, stable_seconds=3600, overrides={
        "storage": {"database_url": database_url}, "worker": {"enabled_in_serve": False}}), port)


def bench_scaling(work: Path, files: list[Path], studies: list[Path]) -> dict:
    """Ingest per serve process (4 associations each) and studies/hour per CPU worker."""
    run = work / "scaling"
    associations = 4
    results: dict = {"associations": associations, "images": len(files)}
    results["storescp_images_per_s"] = _storescp_images_per_s(run / "storescp", files, associations)
    with PostgresCluster(durable=True) as postgres:
        one = {"sqlite": f"sqlite:///{run / 'sqlite' / 'node.db'}", "postgresql": postgres.create_database("one")}
        for backend, url in one.items():
            node = _serve_for_ingest(run / backend, url).start()
            try:
                results[f"{backend}_images_per_s"] = len(files) / _send(node.port, "ICHNODE", files, associations)
            finally:
                node.stop()
        shared = postgres.create_database("two")
        nodes = [_serve_for_ingest(run / f"two-{n}", shared).start() for n in range(2)]
        try:
            halves = [files[0::2], files[1::2]]
            with ThreadPoolExecutor(2) as pool:
                seconds = max(pool.map(lambda pair: _send(pair[0].port, "ICHNODE", pair[1], associations),
                                       zip(nodes, halves)))
            results["two_serve_postgresql_images_per_s"] = len(files) / seconds
        finally:
            for node in nodes:
                node.stop()
        results["workers"] = {count: _studies_per_hour(run / f"workers-{count}", postgres, studies, count)
                              for count in (1, 2)}
    return results


def _log_events(folder: Path, event: str) -> list[dict]:
    path = folder / "triage.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


def _studies_per_hour(run: Path, postgres: PostgresCluster, studies: list[Path], workers: int) -> dict:
    """`workers` EffClass worker processes on one PostgreSQL queue, fed by one serve
    process: from the first study ready to the last analysed."""
    from datetime import datetime

    url = postgres.create_database(run.name)
    run.mkdir(parents=True)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(run / "effclass.pt", create_model("effclass"), default_model_config("effclass"))
    shared = {"storage": {"root": str(run / "store"), "database_url": url}}
    port = free_port()
    (run / "serve").mkdir()
    processes = [NodeProcess(run / "serve", node_config(run / "serve", port=port, checkpoint=None, stable_seconds=1,
                                                        overrides={**shared, "worker": {"enabled_in_serve": False}}),
                             port).start()]
    try:
        for n in range(workers):
            folder = run / f"worker-{n}"
            folder.mkdir()
            processes.append(NodeProcess(folder, node_config(folder, port=free_port(), checkpoint=checkpoint,
                                                             overrides=shared), 0, command="worker").start())
        for study in studies:
            _send(port, "ICHNODE", sorted((study / "HEAD").glob("*.dcm")), 1)
        wait_for(lambda: sum(len(_log_events(p.folder, "analysed")) for p in processes[1:]) == len(studies),
                 timeout=1800, what="every study analysed", every=0.5)
        memory = max(p.peak_memory_mb() or 0 for p in processes[1:])
    finally:
        for process in processes:
            process.stop()

    def stamp(event: dict) -> float:
        return datetime.fromisoformat(event["time"]).timestamp()

    analysed = [e for p in processes[1:] for e in _log_events(p.folder, "analysed")]
    elapsed = max(map(stamp, analysed)) - min(map(stamp, _log_events(run / "serve", "ready")))
    inference = sum(e["timings_s"]["inference"] for e in analysed)
    return {"studies": len(studies), "slices": sum(e["total_slices"] for e in analysed), "seconds": elapsed,
            "studies_per_hour": len(studies) / elapsed * 3600, "inference_share": inference / (elapsed * workers),
            "worker_peak_memory_mb": memory}


STOW_BATCH = 50  # instances per STOW-RS request (a few tens of MB of 512² slices)
STOW_TOKEN = "bench-stow-token-0123456789"


def _stow(url: str, datasets: list[pydicom.Dataset], headers: dict[str, str]) -> float:
    """Seconds for dicomweb-client to store `datasets` at the DICOMweb root `url`, STOW_BATCH per request."""
    session = requests.Session()
    session.headers.update(headers)
    client = DICOMwebClient(url=url, session=session, timeout=600)
    start = time.perf_counter()
    for first in range(0, len(datasets), STOW_BATCH):
        answer = client.store_instances(datasets[first:first + STOW_BATCH])
        if answer.get("FailedSOPSequence"):  # Orthanc answers an empty one
            raise RuntimeError(f"STOW-RS to {url} refused {len(answer.FailedSOPSequence)} instances")
    return time.perf_counter() - start


def _stow_node(folder: Path, web_port: int) -> NodeProcess:
    """A serve process that only stores, with STOW-RS on its web server at `web_port`."""
    port = free_port()
    folder.mkdir(parents=True)
    return NodeProcess(folder, node_config(folder, port=port, checkpoint=None, stable_seconds=3600, overrides={
        "worker": {"enabled_in_serve": False},
        "web": {"enabled": True, "port": web_port, "token": STOW_TOKEN},
        "dicomweb": {"enabled": True}}), port)


def bench_stow(work: Path, files: list[Path]) -> dict:
    """STOW-RS and C-STORE into the node, and STOW-RS into Orthanc (the reference), each
    into a fresh receiver."""
    run = work / "stow"
    datasets = [pydicom.dcmread(path) for path in files]
    results: dict = {"images": len(files), "batch": STOW_BATCH}
    web_port = free_port()
    node = _stow_node(run / "node-stow", web_port).start()
    try:
        wait_for(lambda: port_open(web_port), timeout=60, what="the node's web server")
        seconds = _stow(f"http://127.0.0.1:{web_port}/dicomweb", datasets, {"Authorization": f"Bearer {STOW_TOKEN}"})
        results["node_stow_images_per_s"] = len(files) / seconds
        results["node_stow_stored"] = len(list((run / "node-stow" / "store").rglob("*.dcm")))
        results["node_stow_peak_memory_mb"] = node.peak_memory_mb()
    finally:
        node.stop()
    node = _stow_node(run / "node-cstore", free_port()).start()
    try:
        results["node_cstore_images_per_s"] = len(files) / _send(node.port, "ICHNODE", files, 1)
    finally:
        node.stop()
    orthanc = Orthanc(run / "orthanc", dicomweb=True).start()
    try:
        results["orthanc_stow_images_per_s"] = len(files) / _stow(orthanc.dicomweb_url, datasets, {})
        results["orthanc_stored"] = len(orthanc.get("/instances"))
    finally:
        orthanc.stop()
    return results


def _print(results: dict) -> None:
    print(f"\n# ichnode benchmark — {results['machine']}\n")
    ingest = results.get("ingest")
    if ingest:
        print("## Ingest (images/s, DCMTK storescu → receiver, loopback)\n")
        print("| associations | node (durable) | storescp --fork | Orthanc | node / storescp | node / Orthanc | node peak MB |")
        print("|---|---|---|---|---|---|---|")
        for a in (1, 4):
            n, s, o = ingest["node"][a], ingest["storescp"][a]["images_per_s"], ingest["orthanc"][a]["images_per_s"]
            print(f"| {a} | {n['images_per_s']:.1f} | {s:.1f} | {o:.1f} | {n['images_per_s'] / s:.2f} | "
                  f"{n['images_per_s'] / o:.2f} | {n['peak_memory_mb']} |")
    inference = results.get("inference")
    if inference:
        print(f"\n## Inference (EffClass slices/s, CPU; node path = {inference['node_backend']})\n")
        print("| batch | eager fp32 | node path | ratio | max ΔP(ICH) |")
        print("|---|---|---|---|---|")
        for batch, row in inference["batches"].items():
            print(f"| {batch} | {row['eager_fp32']:.2f} | {row['node']:.2f} | {row['ratio']:.2f} | "
                  f"{row['max_probability_difference']:.1e} |")
    gradcam = results.get("gradcam")
    if gradcam:
        print(f"\n## Grad-CAM ({gradcam['key_slices']} key slices, EffClass at {gradcam['layer']}, CPU)\n")
        print("| path | seconds | vs full network |")
        print("|---|---|---|")
        print(f"| full network (pytorch-grad-cam, the previous path) | {gradcam['full_network_s']:.2f} | 1.00 |")
        print(f"| split, from the inference pass's features (the node) | {gradcam['split_from_features_s']:.2f} | "
              f"{gradcam['ratio']:.1f}× |")
        print(f"| split, from the inputs (evaluation; aug_smooth) | {gradcam['split_from_inputs_s']:.2f} | "
              f"{gradcam['full_network_s'] / gradcam['split_from_inputs_s']:.1f}× |")
        print(f"\nlargest difference of the maps (split from inputs vs full network): "
              f"{gradcam['max_map_difference']:.1e}")
    e2e = results.get("end_to_end")
    if e2e:
        print(f"\n## End to end ({e2e['slices']} slices, last instance in → SC stored in Orthanc)\n")
        print("| stage | seconds |")
        print("|---|---|")
        for stage, seconds in e2e["stages_s"].items():
            print(f"| {stage} | {seconds:.2f} |")
        print(f"| **total** | **{e2e['total_s']:.2f}** |")
        print(f"| total excluding the wait | {e2e['excluding_wait_s']:.2f} |")
        print(f"\nnode peak memory: {e2e['peak_memory_mb']} MB")
    monitoring = results.get("monitoring")
    if monitoring:
        print(f"\n## Monitoring: reading a year's triage log ({monitoring['studies']} studies, "
              f"{monitoring['lines']} lines, {monitoring['megabytes']:.0f} MB)\n")
        print("| read | seconds | vs json.loads of every line |")
        print("|---|---|---|")
        print(f"| json.loads of every line (reference) | {monitoring['parse_every_line_s']:.2f} | 1.00 |")
        print(f"| first read after start (TriageHistory) | {monitoring['first_read_s']:.2f} | "
              f"{monitoring['first_read_ratio']:.2f} |")
        print(f"| a scrape after 100 new events | {monitoring['after_100_new_events_s']:.4f} | "
              f"{monitoring['after_100_new_events_s'] / monitoring['parse_every_line_s']:.4f} |")
        print(f"| one study's timeline (study page) | {monitoring['one_study_timeline_s']:.2f} | "
              f"{monitoring['timeline_ratio']:.2f} |")
    stow = results.get("stow")
    if stow:
        reference = stow["orthanc_stow_images_per_s"]
        print(f"\n## STOW-RS ingest ({stow['images']} images, {stow['batch']} per STOW-RS request, loopback)\n")
        print("| sender → receiver | images/s | vs Orthanc STOW-RS |")
        print("|---|---|---|")
        print(f"| dicomweb-client → Orthanc STOW-RS (DICOMweb plugin; reference) | {reference:.1f} | 1.00 |")
        for key, label in (("node_stow_images_per_s", "dicomweb-client → node STOW-RS (durable)"),
                           ("node_cstore_images_per_s", "storescu, 1 association → node C-STORE (durable)")):
            print(f"| {label} | {stow[key]:.1f} | {stow[key] / reference:.2f} |")
        print(f"\nnode peak memory during STOW-RS: {stow['node_stow_peak_memory_mb']} MB; stored: node "
              f"{stow['node_stow_stored']}, Orthanc {stow['orthanc_stored']}")


def _print_scaling(scaling: dict) -> None:
    print(f"\n## Scaling: several processes on one queue ({scaling['images']} images, "
          f"{scaling['associations']} associations per serve process)\n")
    reference = scaling["storescp_images_per_s"]
    print("| receiver | images/s | vs storescp --fork |")
    print("|---|---|---|")
    print(f"| DCMTK storescp --fork (no fsync, no database) | {reference:.1f} | 1.00 |")
    for key, label in (("sqlite_images_per_s", "one serve process, SQLite"),
                       ("postgresql_images_per_s", "one serve process, PostgreSQL"),
                       ("two_serve_postgresql_images_per_s", "two serve processes, one PostgreSQL (sum)")):
        print(f"| {label} | {scaling[key]:.1f} | {scaling[key] / reference:.2f} |")
    print("\n| CPU worker processes (EffClass) | studies | slices | seconds | studies/hour | inference share | "
          "peak MB per worker |")
    print("|---|---|---|---|---|---|---|")
    for count, row in scaling["workers"].items():
        print(f"| {count} | {row['studies']} | {row['slices']} | {row['seconds']:.1f} | "
              f"{row['studies_per_hour']:.0f} | {row['inference_share']:.2f} | {row['worker_peak_memory_mb']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500, help="slices for the ingest run")
    parser.add_argument("--only", choices=["ingest", "inference", "gradcam", "end_to_end", "monitoring", "scaling",
                                           "stow"], action="append")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    wanted = set(args.only or ["ingest", "inference", "gradcam", "end_to_end", "monitoring", "scaling", "stow"])
    results: dict = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
                                f"{platform.python_implementation()} {platform.python_version()}, torch "
                                f"{torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"}
    work = Path(tempfile.mkdtemp(prefix="ichnode-bench-"))
    try:
        data = work / "data"
        studies = -(-args.slices // 30)
        write_studies(data, SyntheticOptions(studies=studies, seed=7, min_slices=30, max_slices=30))
        files = sorted(data.glob("study_*/HEAD/*.dcm"))[: args.slices]
        if "ingest" in wanted:
            results["ingest"] = bench_ingest(work, files)
        if "stow" in wanted:
            results["stow"] = bench_stow(work, files)
        slices = [pydicom.dcmread(f) for f in files[:16]]
        if "inference" in wanted:
            results["inference"] = bench_inference(slices, (1, 4, 8, 16), repeats=3)
        if "gradcam" in wanted:
            results["gradcam"] = bench_gradcam(slices, repeats=3)
        if "end_to_end" in wanted:
            e2e_data = work / "e2e-data"
            write_studies(e2e_data, SyntheticOptions(studies=1, seed=8, min_slices=32, max_slices=32))
            results["end_to_end"] = bench_end_to_end(work, e2e_data / "study_0000")
        if "monitoring" in wanted:
            results["monitoring"] = bench_monitoring(work)
        if "scaling" in wanted:
            scaling_data = work / "scaling-data"
            write_studies(scaling_data, SyntheticOptions(studies=6, seed=9, min_slices=32, max_slices=32))
            results["scaling"] = bench_scaling(work, files, sorted(scaling_data.iterdir()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(results)
    if "scaling" in results:
        _print_scaling(results["scaling"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
