"""SIGTERM ends the node within its stop budget, whatever is in flight, and loses nothing."""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from demo.peers import NodeProcess, node_config
from node.service import STOP_SECONDS, stop_within
from storage.db import Database, Delivery, DeliveryState
from storage.store import InstanceStore
from tests.conftest import add_delivery
from tests.peers import free_port, wait_for


class SilentPeer:
    """A PACS that accepts connections and never answers a byte (hung, or behind a
    firewall that drops its replies)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SilentPeer:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def __exit__(self, *_: object) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def test_sigterm_ends_serve_within_its_budget_with_a_pacs_that_stopped_answering(tmp_path: Path) -> None:
    """A result is being sent to a PACS that stopped answering, each step allowed 300 s:
    serve still exits after SIGTERM within its budget, and the result stays queued."""
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    folder = store.result_folder("1.2.3", "1.2.3.9")
    store.write_result(folder, {"sc-0001.dcm": Path(get_testdata_file("CT_small.dcm")).read_bytes()})
    store.publish_result(folder)
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    add_delivery(database, str(folder), DeliveryState.PENDING)
    port = free_port()
    with SilentPeer() as pacs:
        config = node_config(tmp_path, port=port, checkpoint=None, destinations=[("pacs", "PACS", pacs.port)],
                             overrides={"delivery": {"timeout_seconds": 300}, "worker": {"enabled_in_serve": False}})
        node = NodeProcess(tmp_path, config, port).start()
        try:
            wait_for(lambda: pacs.accepted, timeout=60, what="the node to connect to the PACS")
            node.process.send_signal(signal.SIGTERM)
            # The budget is STOP_SECONDS; a loaded test machine gets more, and 300 s is what it was.
            wait_for(lambda: node.process.poll() is not None, timeout=3 * STOP_SECONDS, what="serve to stop")
        finally:
            node.stop()
    output = node.output()
    assert node.process.returncode == 0, output[-3000:]
    assert "stopped" in output
    with database.read() as session:
        delivery = session.query(Delivery).one()
        assert delivery.state != DeliveryState.SENT and delivery.attempts <= 1  # queued, taken again on restart
    database.dispose()


def test_what_outlives_the_stop_budget_is_cut_off_with_its_name_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A thread that does not stop (an analysis, a job waiting on a locked database) does
    not hold the process: at the deadline it exits, naming what was still busy."""
    release, exited = threading.Event(), []
    stuck = threading.Thread(target=release.wait, name="worker")  # not a daemon: it would hold the exit
    stuck.start()
    try:
        with caplog.at_level(logging.WARNING, logger="node.service"):
            stop_within(0.2, exit_process=exited.append).join(timeout=30)
    finally:
        release.set()
        stuck.join()
    assert exited == [0]
    busy = re.search(r"still busy 0.2 s after the stop began \((.*)\); exiting", caplog.text)
    assert busy and "worker" in busy.group(1).split(", ")
