"""The Storage SCP: AE set-up and thin event handlers (one function per event).

It also takes the Storage Commitment reports (N-EVENT-REPORT) of destinations with
commitment = true, which open an association to the node to send them (node.commitment)."""

from __future__ import annotations

import logging
import ssl

from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AE,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from node.commitment import Commitments
from node.config import NodeSection
from node.errors import ConfigError
from node.guard import GuardedAssociationServer, start_guarded_server
from node.ingest import Ingest, Status

__all__ = ["build_ae", "handle_store", "handle_association_end", "handle_echo", "handle_event_report", "tls_context",
           "start_scp"]

log = logging.getLogger(__name__)


def build_ae(node: NodeSection) -> AE:
    """An AE answering to `node.ae_title` that accepts every storage SOP class in every
    transfer syntax pynetdicom knows (compressed ones included, stored as received)."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.maximum_pdu_size
    ae.require_called_aet = True
    # Also enforced by the guard's socket deadlines; pynetdicom's own timers only run while
    # its reactor is not blocked reading.
    ae.acse_timeout = node.acse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds
    if node.allowed_calling_aets:
        ae.require_calling_aet = list(node.allowed_calling_aets)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def handle_store(event: Event, ingest: Ingest) -> int:
    """C-STORE: decode just enough to file the instance, write what was sent."""
    try:
        dataset = event.dataset
        encoded = event.encoded_dataset()
    except Exception as exc:  # a dataset pydicom cannot parse
        log.warning("C-STORE from %s could not be decoded: %s", event.assoc.requestor.ae_title, exc)
        return Status.CANNOT_UNDERSTAND
    return ingest.receive(
        dataset,
        encoded,
        calling_aet=event.assoc.requestor.ae_title,
        transfer_syntax_uid=event.context.transfer_syntax,
        association=event.assoc,
    )


def handle_association_end(event: Event, ingest: Ingest) -> None:
    """The connection closed (after a release, an abort, a network timeout or a dropped
    connection alike): the study the association was sending is quiet from now."""
    ingest.association_ended(event.assoc)


def handle_echo(event: Event) -> int:
    return Status.SUCCESS


def handle_event_report(event: Event, commitments: Commitments) -> tuple[int, None]:
    """N-EVENT-REPORT: a destination's Storage Commitment result, recorded in the database."""
    return commitments.report(event)


def tls_context(node: NodeSection) -> ssl.SSLContext | None:
    """The server TLS context of node.tls_*, or None when TLS is off."""
    if node.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(node.tls_certificate, node.tls_private_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"node.tls_certificate {node.tls_certificate} and node.tls_private_key {node.tls_private_key} "
            f"cannot be used: they must be a PEM certificate and the PEM private key that belongs to it "
            f"({_reason(exc)})") from exc
    if node.tls_ca_certificates is not None:
        try:
            context.load_verify_locations(node.tls_ca_certificates)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"node.tls_ca_certificates {node.tls_ca_certificates} is not a PEM bundle of CA "
                              f"certificates ({_reason(exc)})") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: Exception) -> str:
    """OpenSSL's reason in words; its bare '[SSL] PEM lib (_ssl.c:N)' says only that a
    file is not the PEM it should be."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason.replace("_", " ").lower() if exc.reason else "not readable as PEM"
    return exc.strerror or str(exc)


def start_scp(node: NodeSection, ingest: Ingest, commitments: Commitments | None = None) -> GuardedAssociationServer:
    """Listen on node.host:node.port in background threads, behind the guard against
    unauthenticated and stalled peers (node.guard); returns the server. With
    `commitments`, Storage Commitment reports are recorded (`serve` always passes it)."""
    ae = build_ae(node)
    handlers = [(evt.EVT_C_STORE, handle_store, [ingest]), (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_CONN_CLOSE, handle_association_end, [ingest])]
    if commitments is not None:
        # A destination reporting its Storage Commitment opens the association as the SCP of
        # the Push Model; the SCP/SCU Role Selection it may propose for that is accepted.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        handlers.append((evt.EVT_N_EVENT_REPORT, handle_event_report, [commitments]))
    context = tls_context(node)
    server = start_guarded_server(ae, node, handlers, context)
    log.info("listening as %s on %s:%d%s", node.ae_title, node.host, node.port,
             " (DICOM TLS)" if context else "")
    return server
