"""Kestrel's OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine."""

from kestrel_server.app import ServerArgs, build_app

__all__ = ["ServerArgs", "build_app"]
