"""Starting the engine core process and waiting until it is ready (`CoreProcess`,
`launch_core`), for `MPAsyncEngine.launch` and the `--api-server-count N` launcher."""

from __future__ import annotations

import logging
import os
import pickle
import select
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import msgspec

from kestrel.config import EngineConfig
from kestrel.engine import core_protocol as cp
from kestrel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How long the owner waits for the core to stop after Shutdown before killing it.
CORE_STOP_TIMEOUT_S = 30.0


def new_ipc_address(kind: str) -> str:
    """A fresh ipc:// endpoint in the temporary directory (unique per call)."""
    return f"ipc://{Path(tempfile.gettempdir()) / f'kestrel-{kind}-{uuid.uuid4().hex[:12]}'}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped by its parent yet) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class CoreProcess:
    """A started engine core process (`python -m kestrel.engine.core_process`) and what it
    reported when ready. A plain subprocess, not multiprocessing: nothing of the caller's
    __main__ is re-imported, and the caller needs no `if __name__ == "__main__"` guard."""

    def __init__(self, config: EngineConfig, max_queued_requests: int | None, log_level: str):
        self.input_address = new_ipc_address("core")
        read_fd, write_fd = os.pipe()
        spec = pickle.dumps(
            {
                "config": config,
                "input_address": self.input_address,
                "max_queued_requests": max_queued_requests,
                "ready_fd": write_fd,
                "log_level": log_level,
            }
        )
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kestrel.engine.core_process"],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        assert self.process.stdin is not None
        self.process.stdin.write(spec)
        self.process.stdin.close()
        self._ready_fd = read_fd
        self.facts: cp.CoreFacts | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def wait_ready(self) -> cp.CoreFacts:
        """Blocks until the core loaded its model; raises its start-up error otherwise."""
        chunks: list[bytes] = []
        try:
            while True:
                readable, _, _ = select.select([self._ready_fd], [], [], 0.2)
                if readable:
                    chunk = os.read(self._ready_fd, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                elif not self.is_alive():
                    break
        finally:
            os.close(self._ready_fd)
        if not chunks:
            self.process.wait(10)
            raise RuntimeError(
                f"the engine core process exited during start-up (code {self.exitcode}); "
                "see its log above"
            )
        kind, payload, type_name = msgspec.msgpack.decode(b"".join(chunks))
        if kind == "error":
            self.process.wait(10)
            if type_name in ("ValueError", "KeyError", "FileNotFoundError", "ConfigError"):
                raise ValueError(payload)
            raise RuntimeError(payload)
        self.facts = msgspec.msgpack.decode(payload, type=cp.CoreFacts)
        return self.facts

    def stop(self, timeout_s: float = CORE_STOP_TIMEOUT_S) -> None:
        """After a Shutdown message: waits for the process, then kills it if it lingers."""
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("the engine core did not stop within %.0f s: killing it", timeout_s)
            self.kill()

    def kill(self) -> None:
        if self.is_alive():
            self.process.kill()
            self.process.wait(10)


def launch_core(
    config: EngineConfig, *, max_queued_requests: int | None, log_level: str = "INFO"
) -> tuple[CoreProcess, Tokenizer | None]:
    """Starts the core process and loads the tokenizer here meanwhile; returns both once the
    core is ready. The model is resolved (fetched) here first, so the two processes never
    fetch it at the same time."""
    from kestrel.engine.setup import load_tokenizer
    from kestrel.model_source import resolve_model

    source = resolve_model(config.model, revision=config.revision)
    core = CoreProcess(config, max_queued_requests, log_level)
    try:
        tokenizer = load_tokenizer(config, source)
        core.wait_ready()
    except BaseException:
        core.kill()
        raise
    return core, tokenizer
