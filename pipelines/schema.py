"""The base of every config class: frozen, and a key it does not know is an error."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

STRICT = ConfigDict(extra="forbid", frozen=True)


class Schema(BaseModel):
    model_config = STRICT
