"""The Storage SCP: AE set-up and thin event handlers (one function per event)."""

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
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import Verification

from node.config import NodeSection
from node.errors import ConfigError
from node.ingest import Ingest, Status

__all__ = ["build_ae", "handle_store", "handle_echo", "tls_context", "start_scp"]

log = logging.getLogger(__name__)


def build_ae(node: NodeSection) -> AE:
    """An AE answering to `node.ae_title` that accepts every storage SOP class in every
    transfer syntax pynetdicom knows (compressed ones included, stored as received)."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.maximum_pdu_size
    ae.require_called_aet = True
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
    )


def handle_echo(event: Event) -> int:
    return Status.SUCCESS


def tls_context(node: NodeSection) -> ssl.SSLContext | None:
    """The server TLS context of node.tls_*, or None when TLS is off."""
    if node.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(node.tls_certificate, node.tls_private_key)
        if node.tls_ca_certificates is not None:
            context.load_verify_locations(node.tls_ca_certificates)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"node.tls_*: cannot load {node.tls_certificate} / {node.tls_private_key}: {exc}") from exc
    return context


def start_scp(node: NodeSection, ingest: Ingest) -> ThreadedAssociationServer:
    """Listen on node.host:node.port in background threads; returns the server."""
    ae = build_ae(node)
    handlers = [(evt.EVT_C_STORE, handle_store, [ingest]), (evt.EVT_C_ECHO, handle_echo)]
    context = tls_context(node)
    server = ae.start_server((node.host, node.port), block=False, evt_handlers=handlers, ssl_context=context)
    log.info("listening as %s on %s:%d%s", node.ae_title, node.host, node.port,
             " (DICOM TLS)" if context else "")
    return server
