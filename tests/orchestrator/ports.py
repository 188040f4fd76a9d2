"""Ports that misbehave the way a wrong address does: nothing listens, or something listens and never answers."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

__all__ = ["closed_port", "silent_port"]


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` that accepts connections and never answers (another service's port, a firewall)."""
    server = socket.socket()
    server.bind((host, 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in accepted:
            conn.close()
