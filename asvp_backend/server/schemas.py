"""Request bodies Label Studio sends, validated: a wrong type is a 422 that names the field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BadRequest(ValueError):
    """Turned into a 400 with the message; never carries a secret."""


def parse_project_id(value: Any) -> int:
    """Label Studio names a project as "<id>.<created_at timestamp>"; API users may send the bare id."""
    if isinstance(value, bool):
        raise BadRequest("project must be a project id such as 3 or '3.1700000000'")
    if isinstance(value, int):
        project_id = value
    elif isinstance(value, str) and value.split(".", 1)[0].strip().isdigit():
        project_id = int(value.split(".", 1)[0])
    elif isinstance(value, dict) and isinstance(value.get("id"), int):
        project_id = value["id"]
    else:
        raise BadRequest("project must be a project id such as 3 or '3.1700000000'")
    if project_id <= 0 or project_id >= 2**31:
        raise BadRequest("project id out of range")
    return project_id


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: str | int
    label_config: str = Field(alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    extra_params: dict[str, Any] | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]]
    project: str | int | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = Field(default=None, repr=False)  # may carry image-host passwords


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    action: str
    project: dict[str, Any] | int | str | None = None
