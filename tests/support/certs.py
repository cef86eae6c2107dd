"""Throwaway X.509 certificates for TLS tests, made with the ``openssl`` command: a CA, a
server and a client signed by it, and a client signed by another (untrusted) CA. PEM files,
unencrypted P-256 keys (DCMTK and Python both read them)."""

from __future__ import annotations

import subprocess
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.helpers import require, storescp


@dataclass(frozen=True)
class KeyPair:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: KeyPair
    client: KeyPair
    untrusted_client: KeyPair


def _openssl(*args: str | Path) -> None:
    subprocess.run([require("openssl"), *map(str, args)], check=True, capture_output=True)


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    _openssl(
        "req", "-x509", *_NEW_KEY, "-keyout", pair.private_key, "-out", pair.certificate,
        "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def _leaf(folder: Path, name: str, ca: KeyPair, extensions: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    request, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text(f"basicConstraints=CA:FALSE\n{extensions}\n")
    _openssl(
        "req", "-new", *_NEW_KEY, "-keyout", pair.private_key, "-out", request,
        "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.certificate, "-CAkey", ca.private_key,
        "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", pair.certificate,
    )  # fmt: skip
    return pair


def make_certificates(folder: Path) -> Certificates:
    """Generate the set in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    server = _leaf(
        folder,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth")
    rogue = _ca(folder, "rogue-ca")
    untrusted = _leaf(folder, "untrusted-client", rogue, "extendedKeyUsage=clientAuth")
    return Certificates(ca.certificate, server, client, untrusted)


def tls_destination(port: int, certs: Certificates) -> dict[str, Any]:
    """A ``[[destinations]]`` entry for a TLS storescp on loopback that trusts our client
    certificate (see ``tests.test_tls.tls_storescp``)."""
    return {
        "name": "pacs",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": port,
        "tls": True,
        "ca_certificates": certs.ca,
        "certificate": certs.client.certificate,
        "private_key": certs.client.private_key,
    }


def with_cert(pair: KeyPair, ca: Path) -> list[str]:
    """DCMTK's options for a TLS connection with ``pair`` as our certificate."""
    return ["+tls", str(pair.private_key), str(pair.certificate), "+cf", str(ca)]


def tls_storescp(port: int, out: Path, certs: Certificates) -> AbstractContextManager[Path]:
    """DCMTK ``storescp`` over TLS that requires a client certificate from our CA."""
    return storescp(port, out, options=[*with_cert(certs.server, certs.ca), "--require-peer-cert"])
