"""Running the HTTP server over an engine: shared by `kestrel serve` (cli.py) and the API server
processes of `--api-server-count N` (multi_server.py)."""

from __future__ import annotations

import argparse
import logging
import signal

from kestrel.config import EngineConfig
from kestrel.config_args import dataclass_from_namespace
from kestrel_server.app import ServerArgs


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the parsed flags (MODEL and the engine group; --dtype aliases are
    resolved while parsing); raises ConfigError naming a bad value."""
    return dataclass_from_namespace(EngineConfig, args)


def setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def serve_http(engine, args: argparse.Namespace, sockets: list) -> int:
    """Runs the HTTP server over `engine` on the bound `sockets` until a signal or the
    engine's death."""
    import uvicorn

    from kestrel_server.app import build_app
    from kestrel_server.shutdown import DrainingServer

    app = build_app(engine, ServerArgs.from_namespace(args))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level or args.log_level,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
    )
    server = DrainingServer(config, engine, drain_s=args.shutdown_timeout)
    # uvicorn handles SIGINT/SIGTERM: stop accepting, let in-flight requests finish (up to
    # --shutdown-timeout, then they end with an error), then the app's lifespan shuts the
    # engine down. Afterwards uvicorn
    # re-raises the signal into the handlers it found; these make that a clean exit (code 0)
    # instead of a KeyboardInterrupt traceback or death by SIGTERM.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    scheme = "https" if args.ssl_certfile else "http"
    port = sockets[0].getsockname()[1]
    logging.getLogger(__name__).info("serving on %s://%s:%d", scheme, args.host, port)
    server.run(sockets=sockets)
    if received:
        logging.getLogger(__name__).info("stopped by %s", signal.Signals(received[0]).name)
    if server.engine_died:
        return 1
    return 0 if server.started else 1
