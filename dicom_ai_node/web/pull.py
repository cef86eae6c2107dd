"""``POST /api/pull``: what ``dicom-ai-node run`` does, from the API.

The query (C-FIND) runs in the request, so an unknown study, route or source gets its answer
at once (404, 400); the retrieval runs on a background thread, and each study's outcome is a
``retrieved`` or ``retrieve_failed`` event in the job log. ``POST /jobs/pull`` is the same
from the job list's form (an urlencoded body carrying the form token, see ``auth.py``), and
answers with the job list and the outcome as a notice.
"""

from __future__ import annotations

import threading
from datetime import date
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field, ValidationError, model_validator
from sqlalchemy import Engine

from dicom_ai_node.retrieve import RetrieveError, Sources, retrieve_studies


class PullRequest(BaseModel):
    """A study (``study``) or the studies since a day (``since``, with ``modality``)."""

    route: str
    study: str | None = Field(default=None, description="Study Instance UID")
    since: date | None = None
    modality: str | None = None
    source: str | None = Field(default=None, description="[[sources]] name; the first if none")

    @model_validator(mode="after")
    def _one_of(self) -> PullRequest:
        if (self.study is None) == (self.since is None):
            raise ValueError("give either study or since")
        return self


class PullAccepted(BaseModel):
    source: str
    studies: list[str]


def start_pull(sources: Sources, engine: Engine, request: PullRequest) -> PullAccepted:
    """Query the source at once and retrieve what matched on a background thread; an
    ``HTTPException`` says what is unknown (400), missing (404) or unreachable (502)."""
    try:
        retriever = sources.retriever(request.route, request.source)
    except LookupError as exc:
        raise HTTPException(400, str(exc)) from None
    try:
        matches = retriever.find(request.study, request.since, request.modality)
    except RetrieveError as exc:
        raise HTTPException(502, f"{retriever.source.name}: {exc}") from None
    if not matches:
        raise HTTPException(404, f"{retriever.source.name} holds no matching study")
    threading.Thread(
        target=retrieve_studies,
        args=(retriever, matches, request.route, engine),
        name="pull",
        daemon=True,
    ).start()
    return PullAccepted(
        source=retriever.source.name, studies=[m.study_instance_uid for m in matches]
    )


def pull_router(sources: Sources, engine: Engine) -> APIRouter:
    """The ``/api/pull`` route and the job list's ``/jobs/pull`` form (the caller adds the
    token check)."""
    router = APIRouter()

    @router.post(
        "/api/pull",
        tags=["api"],
        status_code=202,
        response_model=PullAccepted,
        responses={
            400: {"description": "Unknown route or source"},
            404: {"description": "The source holds no such study"},
            502: {"description": "The source cannot be queried"},
        },
    )
    def pull(request: PullRequest) -> PullAccepted:
        """Query a configured source and retrieve what matches into the node, in the
        background (C-MOVE to the node's listener, or C-GET)."""
        return start_pull(sources, engine, request)

    @router.post("/jobs/pull", include_in_schema=False)
    async def pull_form(request: Request) -> RedirectResponse:
        # An urlencoded form, parsed here: FastAPI's Form() needs python-multipart.
        form = {k: v[0].strip() for k, v in parse_qs((await request.body()).decode()).items()}
        try:
            asked = PullRequest.model_validate({k: v for k, v in form.items() if v})
            accepted = start_pull(sources, engine, asked)
            notice = f"retrieving {len(accepted.studies)} studies from {accepted.source}"
        except ValidationError as exc:
            notice = "; ".join(str(error["msg"]) for error in exc.errors())
        except HTTPException as exc:
            notice = str(exc.detail)
        return RedirectResponse(f"/jobs?{urlencode({'pulled': notice})}", status_code=303)

    return router
