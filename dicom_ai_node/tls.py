"""DICOM over TLS (PS3.15 Annex B): the contexts for the listener and for destinations.

PS3.15 B.1 (The Basic TLS Secure Transport Connection Profile) runs the DICOM Upper Layer
over TLS with X.509 certificates; its successors in Annex B (B.9 to B.11, the BCP 195
profiles, DCMTK's default) ask for TLS 1.2 or later, which both contexts here enforce. The
IANA port for DICOM over TLS is 2762.

pynetdicom's server wraps each accepted socket and completes the TLS handshake in its
``get_request``, on the one thread that accepts connections: a client that connects and
says nothing holds up every other association until it goes away.
:class:`HandshakeInThreadServer` accepts the plain socket and does the handshake on the
connection's own thread instead, bounded by the ACSE timeout (the time a peer has to
request its association, PS3.8 Section 9.1.5 ARTIM timer).
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

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


class HandshakeInThreadServer(ThreadedAssociationServer):
    """An association server that does the TLS handshake on the connection's own thread.

    pynetdicom 3.0's ``AssociationServer.get_request`` calls ``wrap_socket`` with the
    handshake done on connect, on the accepting thread and with no timeout; here
    ``get_request`` only accepts, and the handshake runs in ``process_request_thread``
    with the ACSE timeout. A failed or timed-out handshake is logged and the connection
    closed; no association is created for it. Stopping the server does not wait for
    handshakes in progress (as it does not wait for a plain connection that is silent): each
    ends at its timeout, or with the process, and one that completes after the stop is
    closed.
    """

    daemon_threads = True  # ThreadingMixIn.server_close joins only non-daemon threads

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        connection, address = self.socket.accept()
        return connection, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        assert self.ssl_context is not None
        request.settimeout(self.ae.acse_timeout)
        try:
            connection = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            request.close()
            log.warning(
                "TLS handshake with %s:%s failed: %s", client_address[0], client_address[1], exc
            )
            return
        if self.socket is None or self.socket.fileno() == -1:  # stopped meanwhile
            connection.close()
            return
        connection.settimeout(None)
        super().process_request_thread(connection, client_address)


def peer_context(peer: PeerSettings, section: str) -> ssl.SSLContext | None:
    """The client context for a configured peer (``None`` without TLS); certificates are read
    now, so a missing file is a configuration error naming ``section.name``."""
    if not peer.tls:
        return None
    return client_context(
        f"{section}.{peer.name}", peer.ca_certificates, peer.certificate, peer.private_key
    )


class TlsAE(AE):
    """A pynetdicom AE whose TLS listeners are :class:`HandshakeInThreadServer`."""

    def make_server(  # type: ignore[override]
        self,
        address: tuple[str, int],
        ae_title: str | None = None,
        contexts: Any = None,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: Any = None,
        server_class: Any = None,
        **kwargs: Any,
    ) -> Any:
        if ssl_context is not None and server_class is ThreadedAssociationServer:
            server_class = HandshakeInThreadServer
        return super().make_server(
            address, ae_title, contexts, ssl_context, evt_handlers, server_class, **kwargs
        )
