"""DICOMweb clients to the node's peers (destinations and sources): sign-in and session.

One place builds every client, so that STOW-RS out, QIDO-RS and WADO-RS sign in the same
way. The credentials file is read each time a client is opened, so a site rotates a
password or token without restarting the node.
"""

from __future__ import annotations

import requests
from dicomweb_client import DICOMwebClient

from node.config import DicomwebPeer, HttpAuth
from node.errors import ConfigError

__all__ = ["read_credentials", "open_client"]


def read_credentials(peer: DicomwebPeer, key: str) -> str:
    """The secret in `peer.credentials_file` (first line, without its line end);
    ConfigError naming `key` when the file is missing, unreadable, empty or malformed."""
    path = peer.credentials_file
    if path is None:
        raise ConfigError(f"{key}.auth = \"{peer.auth}\" needs {key}.credentials_file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}.credentials_file {path} cannot be read: {exc}") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ConfigError(f"{key}.credentials_file {path} is empty")
    if peer.auth == HttpAuth.BASIC and ":" not in secret:
        raise ConfigError(f"{key}.credentials_file {path} must hold user:password on its first line")
    return secret


def open_client(peer: DicomwebPeer, key: str) -> DICOMwebClient:
    """A dicomweb-client for `peer`, signed in as its `auth` says, with its timeout and
    without the library's own retries: deliveries retry with their recorded back-off, and
    a failed poll runs again at its next interval."""
    session = requests.Session()
    if peer.auth == HttpAuth.BASIC:
        user, _, password = read_credentials(peer, key).partition(":")
        session.auth = (user, password)
    elif peer.auth == HttpAuth.BEARER:
        session.headers["Authorization"] = f"Bearer {read_credentials(peer, key)}"
    client = DICOMwebClient(url=peer.url.rstrip("/"), session=session, timeout=peer.timeout_seconds)
    client.set_http_retry_params(retry=False)
    return client
