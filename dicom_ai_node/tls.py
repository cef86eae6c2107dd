"""DICOM over TLS (PS3.15 Annex B): the contexts for the listener and for destinations.

PS3.15 B.1 (The Basic TLS Secure Transport Connection Profile) runs the DICOM Upper Layer
over TLS with X.509 certificates; its successors in Annex B (B.9 to B.11, the BCP 195
profiles, DCMTK's default) ask for TLS 1.2 or later, which both contexts here enforce. The
IANA port for DICOM over TLS is 2762.

The listener does the handshake on each connection's own thread, within the
pre-association timeout (``dicom_ai_node.receive.guard.GuardedServer``), not on the thread
that accepts connections as pynetdicom's own server does.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from dicom_ai_node.config import ConfigError, PeerSettings, TlsSettings

log = logging.getLogger(__name__)


def _load(what: str, load: Any, *paths: Path) -> None:
    try:
        load(*(str(path) for path in paths))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load {', '.join(map(str, paths))}: {exc}") from None


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The listener's TLS context: its certificate and, to check clients', the CAs.

    With ``require_client_certificate`` a client must present a certificate signed by one
    of ``ca_certificates``; without it, a certificate that is presented is still checked.
    Raises :class:`ConfigError` naming the key when a file cannot be used.
    """
    assert settings.certificate is not None and settings.private_key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(
        "dicom.tls.certificate", context.load_cert_chain, settings.certificate, settings.private_key
    )
    if settings.ca_certificates is not None:
        _load("dicom.tls.ca_certificates", context.load_verify_locations, settings.ca_certificates)
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(
    what: str,
    ca_certificates: Path | None,
    certificate: Path | None = None,
    private_key: Path | None = None,
) -> ssl.SSLContext:
    """A context for connecting to a TLS peer: the peer's certificate must chain to
    ``ca_certificates`` (the system's trust store when ``None``) and name the host; our own
    ``certificate`` is presented when given (peers that require client certificates)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the certificate and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_certificates is None:
        context.load_default_certs()
    else:
        _load(f"{what}.ca_certificates", context.load_verify_locations, ca_certificates)
    if certificate is not None and private_key is not None:
        _load(f"{what}.certificate", context.load_cert_chain, certificate, private_key)
    return context


def peer_context(peer: PeerSettings, section: str) -> ssl.SSLContext | None:
    """The client context for a configured peer (``None`` without TLS); certificates are read
    now, so a missing file is a configuration error naming ``section.name``."""
    if not peer.tls:
        return None
    return client_context(
        f"{section}.{peer.name}", peer.ca_certificates, peer.certificate, peer.private_key
    )
