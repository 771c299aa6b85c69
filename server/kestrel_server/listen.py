"""`kestrel serve`'s listening socket and TLS files, checked before any engine starts: a port
in use or a certificate that does not load fails in a second with exit code 2, not after the
model has loaded."""

from __future__ import annotations

import argparse
import sys


def listen_socket(host: str, port: int):
    """The server's listening socket, bound now: a port in use fails here, before any model
    loads or engine core process starts (and the port stays ours until uvicorn serves it)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_or_explain(args: argparse.Namespace):
    """listen_socket for --host/--port, or None after printing why not (exit code 2)."""
    import errno

    try:
        return listen_socket(args.host, args.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = f"port {args.port} is already in use on {args.host}; choose another --port"
        else:
            why = f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        print(f"kestrel serve: error: {why}", file=sys.stderr)
        return None


def check_tls(args: argparse.Namespace) -> str | None:
    """--ssl-keyfile/--ssl-certfile: both or neither, and loadable (checked before the model
    loads); the problem, or None."""
    key, cert = args.ssl_keyfile, args.ssl_certfile
    if key is None and cert is None:
        return None
    if key is None or cert is None:
        return "--ssl-keyfile and --ssl-certfile go together: give both"
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load --ssl-certfile {cert!r} / --ssl-keyfile {key!r}: {exc}"
    return None
