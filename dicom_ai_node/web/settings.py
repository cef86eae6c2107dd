"""Settings of the operations surface: webhooks that announce findings and failures.

The node's ``Settings`` holds them as ``notifications: list[NotificationSettings]``, one
``[[notifications]]`` table per webhook in ``node.toml``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Trigger = Literal["positive", "failed"]


class NotificationSettings(BaseModel):
    """A webhook: ``url`` receives a JSON POST for each event named in ``on``.

    ``positive``: a job's result is a positive finding (once per job). ``failed``: a job
    failed (inference) or could not deliver its results (each time it happens).
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", description="Where to POST (http or https)")
    on: list[Trigger] = Field(default=["positive", "failed"], min_length=1)
    headers: dict[str, str] = Field(
        default={}, description="Extra request headers, e.g. an Authorization for the receiver"
    )
    timeout: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
