"""Test listeners served by a thread blocked in accept()."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


def stop_accepting(listener: socket.socket, thread: threading.Thread) -> None:
    """Stop a listener and the thread blocked in its accept(). close() alone does not wake that
    thread on Linux: it stays in accept() and, once the descriptor's number is reused by a later
    test's listener, takes that listener's connections. shutdown() wakes it; it ends before the
    number is freed."""
    with suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    thread.join()
    listener.close()
