"""Sockets inside another network namespace, opened from the test process, and byte relays between namespaces.

The lab keeps the root namespace free of routes to its simulated nodes, yet tests need to reach across, the way
``kubectl port-forward`` does: an agent in a node netns uploading to an S3 server on the root loopback, a
controller in the root netns calling an agent listening in a node netns. A socket stays in the namespace it was
created in, so creating it from a short-lived thread that has entered the target netns (setns(2) through ctypes;
Python 3.11 has no ``os.setns``) gives a socket there, while every other thread stays in the root namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Relay", "in_netns", "netns_path", "netns_socket"]

_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """A named namespace's bind mount, or ``netns`` itself when it already is a path."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def in_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a fresh thread that has entered ``netns``; return its result or raise its error.

    The thread ends afterwards, so no thread of the test process is ever left in a lab namespace.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread, re-raised there
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netns_socket(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A new socket that lives in ``netns``."""
    return in_netns(netns, lambda: socket.socket(family, kind, proto))


class Relay:
    """Accepts TCP connections on ``listener`` and pipes each one to a fresh connection from ``connect``.

    One thread accepts; each connection gets two pumps (one per direction, half-close passed on) and its sockets
    are closed once both directions end. ``close`` unblocks everything with ``shutdown`` (which wakes a blocked
    ``accept``/``recv`` on Linux), joins the threads and closes every socket, so a test leaves neither threads
    nor ResourceWarnings behind.
    """

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener = listener
        self._connect = connect
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.host, self.port = listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener shut down by close()
            try:
                upstream = self._connect()
            except OSError:
                client.close()  # the far side refuses: the client sees a reset, like a failed port-forward
                continue
            for sock in (client, upstream):
                # A relay forwards each write at once, as kubectl port-forward does: Nagle would hold small gRPC
                # frames back ~40 ms and distort every latency seen through the relay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(
                    target=self._serve, args=(client, upstream), name=f"relay-{self.port}", daemon=True
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), name=f"relay-{self.port}", daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._sockets.difference_update((client, upstream))
        client.close()
        upstream.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=5)
        with self._lock:  # the acceptor has stopped: no connection can be added any more
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        self._listener.close()
        for sock in sockets:
            sock.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass  # reset or shut down by Relay.close(); either way this direction is over
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
