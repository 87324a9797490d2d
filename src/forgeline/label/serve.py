"""`forgeline label serve`: the annotation app on uvicorn. FastAPI and uvicorn are the optional `label` extra, so
they are imported only here, when serving starts, and their absence is one message naming the extra."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from ..errors import ForgelineError

INSTALL_HINT = "pip install 'forgeline[label]'"


def require_web_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ForgelineError(f"forgeline label serve needs FastAPI and uvicorn ({exc.name or 'one'} is not "
                             f"installed): {INSTALL_HINT}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error (and --port 0 picks a free
    port, which serve then prints)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ForgelineError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        # a restarted server must get its port back while the old connections sit in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ForgelineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(db: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> int:
    require_web_extra()
    import uvicorn

    from .app import create_app

    app = create_app(db)
    sock = listen(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"forgeline label: serving {db} at http://{shown_host}:{bound_port}/ (Ctrl-C stops)", flush=True)
    if not is_loopback(host):
        print(f"forgeline label: warning: {host} is reachable from other machines, over plain HTTP: tokens and "
              "answers travel unencrypted; put a TLS proxy in front or bind to 127.0.0.1", file=sys.stderr,
              flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
