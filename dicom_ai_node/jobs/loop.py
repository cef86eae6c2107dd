"""The background loop shared by the stages that poll the job log (worker, notifier)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PollingLoop:
    """A thread that calls :meth:`run_once` until stopped.

    When a pass finds nothing to do the thread sleeps ``poll_seconds``; :meth:`wake` cuts
    the sleep short (new work was just recorded). An error is logged and the loop goes on,
    so a job log that is briefly unavailable does not end a stage.
    """

    thread_name = "loop"

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> bool:
        """Do one pass; ``True`` if there was something to do (then no sleep follows)."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for work now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the pass in hand, waiting for it up to ``timeout`` seconds."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("%s: unexpected error; retrying", self.thread_name)
                worked = False
            if not worked:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
