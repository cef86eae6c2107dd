"""The HTTP server of a node: uvicorn on a background thread of the node's process."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import ClusterSettings, DestinationSettings
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.receive.ingest import Ingest
from dicom_ai_node.retrieve import Sources
from dicom_ai_node.web.app import create_app

log = logging.getLogger(__name__)

TOKEN_ENV = "DICOM_AI_NODE_HTTP_TOKEN"


class HttpServer:
    """Serves the API and dashboard on ``bind``:``port`` (0 = a free port) until ``stop()``.

    The token is ``token``, else ``$DICOM_AI_NODE_HTTP_TOKEN``, else a random one made now
    (``token_generated`` is then true, and :attr:`login_url` is what to print).
    ``health`` returns the node's problems (none = healthy), for ``/healthz``; reads go
    through ``read_sessions`` when given (the node's read-only sessions). ``ingest`` and
    ``stow_max_bytes`` enable STOW-RS (see :mod:`.stow`), ``sources`` ``/api/pull``;
    ``node_timeout_seconds`` tells live nodes of the cluster from dead ones.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        read_sessions: sessionmaker[Session] | None = None,
        metrics: NodeMetrics,
        health: Callable[[], list[str]],
        bind: str = "127.0.0.1",
        port: int = 8080,
        token: str = "",
        destinations: Sequence[DestinationSettings] = (),
        node_name: str = "",
        data_dir: Path = Path(),
        refresh_seconds: int = 15,
        audit: AuditTrail | None = None,
        ingest: Ingest | None = None,
        stow_max_bytes: int = 2**31,
        sources: Sources | None = None,
        node_timeout_seconds: float = ClusterSettings().node_timeout_seconds,
    ) -> None:
        configured = token or os.environ.get(TOKEN_ENV, "")
        self.token_generated = not configured
        self.token = configured or secrets.token_urlsafe(24)
        self.bind = bind
        self._requested_port = port
        self.app = create_app(
            sessions,
            read_sessions=read_sessions,
            token=self.token,
            health=health,
            metrics=metrics,
            destinations=destinations,
            node_name=node_name,
            data_dir=data_dir,
            refresh_seconds=refresh_seconds,
            audit=audit,
            ingest=ingest,
            stow_max_bytes=stow_max_bytes,
            sources=sources,
            node_timeout_seconds=node_timeout_seconds,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when 0 was asked); only after ``start()``."""
        if self._socket is None:
            raise RuntimeError("the HTTP server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The dashboard's address (a wildcard bind is shown as this host's name)."""
        host = socket.getfqdn() if self.bind in ("0.0.0.0", "::", "") else self.bind
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The address that signs a browser in (it carries the token: show it only to the
        operator)."""
        return f"{self.url}?token={self.token}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind, start serving, and return once requests are answered.

        Raises ``OSError`` when the address cannot be bound, ``RuntimeError`` when the
        server does not come up.
        """
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.bind, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        log.info("HTTP API and dashboard on %s", self.url)

    def stop(self) -> None:
        """Stop serving (requests in flight are given a few seconds) and release the port."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None
