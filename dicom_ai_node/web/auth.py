"""Access by token: ``Authorization: Bearer <token>``, or ``?token=<token>`` once in a browser.

A request carrying ``?token=`` is answered with a redirect to the same address without it
and a cookie (HttpOnly, SameSite=Lax) that the browser then sends: the token leaves the
address bar and the history. The cookie holds an HMAC of the token, not the token, and its
name depends on the token, so two nodes on one host keep apart. Missing credentials answer
401, wrong ones 403; an address with too many wrong tokens gets 429 for a while
(:class:`FailedAttempts`), whatever it sends.

State-changing requests authenticated by the cookie (a browser's) must come from the
dashboard's own pages: their ``Origin`` must be the node's and they must carry the form's
``csrf`` value (an HMAC of the token that another site cannot read), the "synchronizer token"
and "verify origin" defences of OWASP's CSRF cheat sheet. Requests with an ``Authorization``
header need neither: a browser never adds that header to a cross-site request by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse

PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FAILURES = 10
FAILURE_WINDOW_SECONDS = 60.0


class AuthError(Exception):
    """A request without (401) or with wrong (403) credentials."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class FailedAttempts:
    """Wrong tokens per client address: more than ``limit`` in ``window`` seconds and the
    address is refused (429) until the oldest of them is ``window`` seconds old. Bounded:
    at most ``max_addresses`` addresses are remembered (the oldest forgotten first)."""

    def __init__(
        self,
        limit: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW_SECONDS,
        max_addresses: int = 10000,
    ) -> None:
        self.limit, self.window, self.max_addresses = limit, window, max_addresses
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or ``None`` if it may now."""
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(address)
            if failures is None:
                return None
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            if not failures:
                del self._failures[address]
                return None
            if len(failures) < self.limit:
                return None
            return max(1, int(failures[0] + self.window - now + 1))

    def failed(self, address: str) -> None:
        with self._lock:
            if address not in self._failures and len(self._failures) >= self.max_addresses:
                del self._failures[next(iter(self._failures))]
            self._failures.setdefault(address, deque(maxlen=self.limit)).append(time.monotonic())


class TokenAuth:
    """Checks a request's token (header or cookie) against the node's."""

    def __init__(
        self,
        token: str,
        attempts: FailedAttempts | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_event(kind, address)`` hears of each ``login`` (a ``?token=`` traded for the
        cookie), ``wrong_token`` and ``rate_limited`` answer (the audit trail)."""
        if not token:
            raise ValueError("an empty token would let anyone in")
        self.token = token
        self.attempts = attempts or FailedAttempts()
        self.on_event = on_event or (lambda kind, address: None)
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.identity = f"token:{digest[:12]}"  # who, in the audit trail (not the token)
        self.cookie_name = f"dicom_ai_node_{digest[:10]}"
        self.cookie_value = hmac.new(token.encode(), b"dashboard-cookie", "sha256").hexdigest()
        self.csrf_token = hmac.new(token.encode(), b"dashboard-form", "sha256").hexdigest()

    def _matches(self, request: Request, given: str, expected: str) -> bool:
        """Compare in constant time; a mismatch counts against the client's address."""
        if hmac.compare_digest(given.encode(), expected.encode()):
            return True
        self.attempts.failed(client_address(request))
        self.on_event("wrong_token", client_address(request))
        return False

    def _not_blocked(self, request: Request) -> None:
        retry_after = self.attempts.retry_after(client_address(request))
        if retry_after is not None:
            self.on_event("rate_limited", client_address(request))
            raise AuthError(429, "too many wrong tokens from this address", retry_after)

    def check(self, request: Request) -> None:
        """Return if the request is authenticated; raise :class:`AuthError` otherwise."""
        self._not_blocked(request)
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError(401, "use Authorization: Bearer <token>")
            if not self._matches(request, value.strip(), self.token):
                raise AuthError(403, "wrong token")
            return
        cookie = request.cookies.get(self.cookie_name)
        if cookie is not None:
            if not self._matches(request, cookie, self.cookie_value):
                raise AuthError(403, "stale session cookie; sign in again")
            if request.method not in SAFE_METHODS:
                self._same_site(request)
            return
        raise AuthError(401, "a token is required")

    def _same_site(self, request: Request) -> None:
        """Refuse (403) a state-changing browser request that did not come from our page."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            raise AuthError(403, "cross-site request refused")
        given = request.query_params.get("csrf", "")
        if not hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            raise AuthError(403, "missing or wrong form token; reload the page")

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Trade a valid ``?token=`` for the cookie and a clean address; refuse a wrong one."""
        given = request.query_params.get("token")
        if given is None or request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        retry_after = self.attempts.retry_after(client_address(request))
        if retry_after is not None:
            self.on_event("rate_limited", client_address(request))
            return PlainTextResponse(
                "too many wrong tokens from this address",
                status_code=429,
                headers={"Retry-After": str(retry_after)},
            )
        if not self._matches(request, given, self.token):
            return PlainTextResponse("wrong token", status_code=403)
        self.on_event("login", client_address(request))
        clean = request.url.remove_query_params("token")
        target = clean.path + (f"?{clean.query}" if clean.query else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            self.cookie_name,
            self.cookie_value,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else ""
