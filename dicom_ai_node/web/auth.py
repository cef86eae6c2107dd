"""Access by token: ``Authorization: Bearer <token>``, or ``?token=<token>`` once in a browser.

A request carrying ``?token=`` is answered with a redirect to the same address without it
and a cookie (HttpOnly, SameSite=Lax) that the browser then sends: the token leaves the
address bar and the history. The cookie holds an HMAC of the token, not the token, and its
name depends on the token, so two nodes on one host keep apart. Missing credentials answer
401, wrong ones 403.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse

PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json"})


class AuthError(Exception):
    """A request without (401) or with wrong (403) credentials."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TokenAuth:
    """Checks a request's token (header or cookie) against the node's."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let anyone in")
        self.token = token
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.cookie_name = f"dicom_ai_node_{digest[:10]}"
        self.cookie_value = hmac.new(token.encode(), b"dashboard-cookie", "sha256").hexdigest()

    def check(self, request: Request) -> None:
        """Return if the request is authenticated; raise :class:`AuthError` otherwise."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError(401, "use Authorization: Bearer <token>")
            if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                raise AuthError(403, "wrong token")
            return
        cookie = request.cookies.get(self.cookie_name)
        if cookie is not None:
            if not hmac.compare_digest(cookie.encode(), self.cookie_value.encode()):
                raise AuthError(403, "stale session cookie; sign in again")
            return
        raise AuthError(401, "a token is required")

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Trade a valid ``?token=`` for the cookie and a clean address; refuse a wrong one."""
        given = request.query_params.get("token")
        if given is None or request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return PlainTextResponse("wrong token", status_code=403)
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
