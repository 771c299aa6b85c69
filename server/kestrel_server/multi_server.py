"""`kestrel serve --api-server-count N` (N > 1): the engine core, then N API server processes
on one listening socket, each a client of the core (`MPAsyncEngine.connect`)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile

from kestrel_server.serve_http import engine_config, serve_http, setup_logging

# Seconds an API server may take to exit after the engine died or the others stopped.
CORE_STOP_GRACE_S = 60.0


def api_server_main(
    args: argparse.Namespace, facts, input_address: str, sock, new_cores=None
) -> None:
    """One of --api-server-count processes: a client of the shared engine core. `new_cores`
    (with --restart-core-on-failure): the end of a pipe on which the parent sends (facts,
    input address) of each core it starts in place of a dead one."""
    import asyncio

    from kestrel.engine.core_client import MPAsyncEngine
    from kestrel.engine.setup import load_tokenizer
    from kestrel.model_source import resolve_model

    setup_logging(args)
    config = engine_config(args)
    tokenizer = load_tokenizer(config, resolve_model(config.model, revision=config.revision))

    async def next_core():
        message = await asyncio.to_thread(new_cores.recv)  # EOFError: the parent is gone
        if isinstance(message, str):  # the parent could not start a new core
            raise RuntimeError(message)  # noqa: TRY004 - an engine failure, not a type error
        return message

    engine = MPAsyncEngine.connect(
        facts,
        tokenizer,
        input_address,
        max_queued_requests=args.max_queued_requests,
        restart_source=next_core if new_cores is not None else None,
    )
    sys.exit(serve_http(engine, args, sockets=[sock]))


def run_api_servers(args: argparse.Namespace, sock) -> int:
    """--api-server-count N > 1: the engine core, then N API server processes on one listening
    socket (`sock`, bound before the core started; shared). SIGINT/SIGTERM are passed on to the API servers, which drain;
    the core stops after them. Exit code 1 when the engine died."""
    import multiprocessing

    from kestrel.engine import core_protocol as cp
    from kestrel.engine.core_client import launch_core
    from kestrel_server.metrics import MULTIPROC_ENV

    log = logging.getLogger(__name__)
    try:
        config = engine_config(args)
        core, _ = launch_core(
            config, max_queued_requests=args.max_queued_requests, log_level=args.log_level
        )
        sock.set_inheritable(True)
    except (ValueError, OSError, RuntimeError) as exc:
        log.debug("start-up failed", exc_info=exc)
        print(f"kestrel serve: error: {exc}", file=sys.stderr)
        sock.close()
        return 2
    # The workers' request metrics go to shared files, so that any worker's /metrics counts all.
    own_metrics_dir = not os.environ.get(MULTIPROC_ENV)
    if own_metrics_dir:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="kestrel-metrics-")
    ctx = multiprocessing.get_context("spawn")
    restart = getattr(args, "restart_core_on_failure", False)
    # With --restart-core-on-failure, each API server learns of a new core through a pipe.
    pipes = [
        ctx.Pipe(duplex=False) if restart else (None, None) for _ in range(args.api_server_count)
    ]
    workers = [
        ctx.Process(
            target=api_server_main,
            args=(args, core.facts, core.input_address, sock, pipes[i][0]),
            name=f"kestrel-api-{i}",
        )
        for i in range(args.api_server_count)
    ]
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for w in workers:
            if w.pid is not None and w.is_alive():
                os.kill(w.pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    for w in workers:
        w.start()
    log.info(
        "%d API servers on http://%s:%d in front of one engine core (pid %d)",
        len(workers), args.host, args.port, core.pid,
    )  # fmt: skip
    code = 0
    try:
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(0.2)
                if w.exitcode not in (None, 0) and not received:
                    # One API server failed (the engine died, or a crash): stop the rest.
                    code = 1
                    forward(signal.SIGTERM, None)
            if not core.is_alive() and not received:
                if restart:
                    core = _replace_core(core, args, config, [w for _, w in pipes], log)
                if not core.is_alive():
                    code = 1
                    forward(signal.SIGTERM, None)
    finally:
        for w in workers:
            w.join(CORE_STOP_GRACE_S)
            if w.is_alive():
                w.kill()
            if w.exitcode not in (0, None):
                code = 1 if not received or w.exitcode == 1 else code
        if core.is_alive():
            import zmq

            push = zmq.Context.instance().socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(core.input_address)
            push.send(cp.request_encoder.encode(cp.Shutdown()))
            push.close()
            core.stop()
        sock.close()
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)
    if received:
        log.info("stopped by %s", signal.Signals(received[0]).name)
    return code


def _replace_core(core, args: argparse.Namespace, config, pipes, log):
    """--restart-core-on-failure: a new core in place of the dead one, announced to every API
    server (which failed its requests and answers 503 meanwhile); the dead core if the new one
    cannot start (the API servers are told, and the server stops)."""
    from kestrel.engine.core_client import launch_core

    log.warning("the engine core died (exit code %s); starting a new one", core.exitcode)
    core.kill()
    try:
        new, _ = launch_core(
            config, max_queued_requests=args.max_queued_requests, log_level=args.log_level
        )
    except (ValueError, OSError, RuntimeError) as exc:
        log.error("the new engine core could not start: %s", exc)
        message = f"the engine core died and could not restart: {exc}"
    else:
        log.warning("the new engine core is ready (pid %d)", new.pid)
        message = (new.facts, new.input_address)
    for pipe in pipes:
        try:
            pipe.send(message)
        except OSError:
            pass  # that API server is gone; the monitor loop sees it
    return core if isinstance(message, str) else new
