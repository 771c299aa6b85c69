"""Errors a caller can cause, typed so that a front end needs no guessing: an
InvalidRequestError names the parameter (`param`, as the OpenAI API spells it) and says the
bad value and the allowed range in its message. It is a ValueError, so plain `except
ValueError` still catches it."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
