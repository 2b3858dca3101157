"""Load: 8 concurrent associations × 100 instances of 512² CT from DCMTK storescu."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from storage.db import Database, Instance, Study
from tests.conftest import require_tool
from tests.peers import NodeProcess, free_port, node_config

ASSOCIATIONS, PER_ASSOCIATION = 8, 100


def _corpus(source: Path, out: Path) -> list[list[Path]]:
    """One study of 100 distinct instances per association, cloned from synthetic slices."""
    slices = sorted(source.glob("HEAD/*.dcm"))
    groups = []
    for a in range(ASSOCIATIONS):
        study, series = generate_uid(), generate_uid()
        folder = out / f"a{a}"
        folder.mkdir(parents=True)
        files = []
        for n in range(PER_ASSOCIATION):
            ds = pydicom.dcmread(slices[n % len(slices)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = n + 1
            path = folder / f"{n:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        groups.append(files)
    return groups


def test_eight_associations_store_every_instance_once(tmp_path: Path, negative_study: Path) -> None:
    storescu = require_tool("storescu")
    groups = _corpus(negative_study, tmp_path / "corpus")
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, stable_seconds=3600), port)
    node.start()
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(ASSOCIATIONS) as pool:
            results = list(pool.map(lambda files: subprocess.run(
                [storescu, "-aet", "SCANNER", "-aec", "ICHNODE", "127.0.0.1", str(port), *map(str, files)],
                capture_output=True, text=True, timeout=600), groups))
        elapsed = time.perf_counter() - started
        peak = node.peak_memory_mb()
    finally:
        node.stop()
    assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results if r.returncode]
    total = ASSOCIATIONS * PER_ASSOCIATION
    with Database(f"sqlite:///{tmp_path / 'node.db'}").read() as session:
        assert session.query(Instance).count() == total
        assert session.query(Study).count() == ASSOCIATIONS
        assert {s.instance_count for s in session.query(Study)} == {PER_ASSOCIATION}
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == total
    output = node.output()
    assert "database is locked" not in output and "Traceback" not in output
    # Nothing the node wrote is readable by other users: instances, folders, database.
    written = [*(tmp_path / "store").rglob("*"), *tmp_path.glob("node.db*")]
    assert written and all(p.stat().st_mode & 0o077 == 0 for p in written), \
        sorted(oct(p.stat().st_mode) + " " + str(p) for p in written if p.stat().st_mode & 0o077)[:3]
    # Reported, not asserted: timings and memory depend on the machine.
    print(f"\nload: {total} instances over {ASSOCIATIONS} associations in {elapsed:.1f} s "
          f"({total / elapsed:.0f} images/s); node peak memory {peak:.0f} MB")
