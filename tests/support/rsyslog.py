"""A real syslog audit repository: Debian's rsyslogd with a config of its own, receiving RFC
5424 over TCP (or TLS, RFC 5425, with rsyslog-gnutls) on loopback and writing each message,
raw, on a line of a file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.certs import Certificates
from tests.support.helpers import wait_for

CONFIG = """
global(workDirectory="{folder}" maxMessageSize="64k"{tls_global})
module(load="imtcp"{tls_module})
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{log}" template="raw")
"""


@contextmanager
def rsyslog(port: int, folder: Path, certs: Certificates | None = None) -> Iterator[Path]:
    """rsyslogd listening on 127.0.0.1:``port`` (TLS with ``certs``' server certificate);
    yields the file it writes messages to."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "audit.log"
    config = folder / "rsyslog.conf"
    tls_global = tls_module = ""
    if certs is not None:
        tls_global = (
            f' DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{certs.ca}"'
            f' DefaultNetstreamDriverCertFile="{certs.server.certificate}"'
            f' DefaultNetstreamDriverKeyFile="{certs.server.private_key}"'
        )
        tls_module = ' StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon"'
    config.write_text(
        CONFIG.format(
            folder=folder, port=port, log=log, tls_global=tls_global, tls_module=tls_module
        )
    )
    rsyslogd = shutil.which("rsyslogd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if rsyslogd is None:
        pytest.fail("rsyslogd is not installed; run `make test`, which installs it")
    proc = subprocess.Popen(
        [rsyslogd, "-n", "-f", str(config), "-i", str(folder / "rsyslog.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(listening, timeout=20)
        yield log
    finally:
        proc.terminate()
        proc.wait(timeout=20)
