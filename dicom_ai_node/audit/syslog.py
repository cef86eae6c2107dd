"""Sending audit messages to a syslog audit repository: RFC 5424 messages over TCP with
octet-counting framing (RFC 6587 3.4.1), or over TLS (RFC 5425), as IHE ATNA's Record Audit
Event transaction asks (facility 10 security/authorization, severity 5 notice, MSGID
``IHE+RFC-3881``, the XML in UTF-8 after a byte-order mark)."""

from __future__ import annotations

import os
import socket
import ssl
from datetime import datetime

PRI = 10 * 8 + 5  # facility 10 (security/authorization messages), severity 5 (notice)
MSGID = "IHE+RFC-3881"
BOM = "\ufeff"


def syslog_message(xml: str, at: datetime, hostname: str, app_name: str) -> bytes:
    """One RFC 5424 message (no structured data) carrying ``xml``, framed by its length."""
    header = f"<{PRI}>1 {at.isoformat(timespec='milliseconds')} {hostname or '-'} "
    header += f"{app_name or '-'} {os.getpid()} {MSGID} - "
    message = (header + BOM + xml).encode()
    return f"{len(message)} ".encode() + message


class SyslogConnection:
    """A TCP (or TLS, with ``context``) connection to the repository, made when needed."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext | None, timeout: float
    ) -> None:
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self._sock: socket.socket | None = None

    def send(self, frame: bytes) -> None:
        """Send one framed message; raises :class:`OSError` (and drops the connection) if it
        cannot."""
        try:
            if self._sock is None:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
                if self.context is not None:
                    sock = self.context.wrap_socket(sock, server_hostname=self.host)
                self._sock = sock
            self._sock.sendall(frame)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
