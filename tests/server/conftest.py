"""Session servers for tests/server (see harness.py): `server` (open, 64 sequences) and
`restricted_server` (API key, one running sequence, one queued request)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kestrel.testing.tiny_models import make_tiny_model
from tests.server.harness import API_KEY, MAX_MODEL_LEN, ServerProcess, start_server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("server-tiny") / "qwen2", "qwen2"))


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    proc = start_server(tiny_model, log, "--max-num-seqs", "64")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def restricted_server(tiny_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """API key from the environment; one running sequence and one queued request at most."""
    log = tmp_path_factory.mktemp("logs") / "restricted.log"
    proc = start_server(
        tiny_model,
        log,
        "--max-num-seqs", "1", "--max-queued-requests", "1",
        env={"KESTREL_API_KEY": API_KEY},
    )  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def offline(tiny_model):
    """The offline engine on the same model: the reference for greedy outputs."""
    from kestrel import LLM

    return LLM(tiny_model, max_model_len=MAX_MODEL_LEN, max_num_seqs=64)
