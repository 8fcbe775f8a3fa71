"""The engine's Ray driver process (executors/ray_driver.py), without a cluster: a call under
way when the process dies fails DriverLost at once instead of waiting for ever, an error the
child raises reaches the caller as itself, and one that does not pickle as its message."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

import pytest

pytest.importorskip("ray")

from orchestrator.executors.ray_driver import DriverLost, RayDriver
from orchestrator.executors.ray_driver_child import portable
from tests.support.wait import wait_until


def silent_port() -> tuple[socket.socket, int]:
    """A port that accepts connections and never answers: a connect there waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, listener.getsockname()[1]


def test_a_call_under_way_when_the_driver_process_dies_fails_driver_lost() -> None:
    driver = RayDriver()
    listener, port = silent_port()
    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            driver.init(address=f"127.0.0.1:{port}", namespace="test")
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=connect, daemon=True)
    try:
        thread.start()
        wait_until(lambda: driver.pending, timeout=60, what="the connect under way in the child")
        assert driver.process is not None and driver.alive()
        os.kill(driver.process.pid, signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the caller still waits on a dead driver"
        assert isinstance(outcome.get("error"), DriverLost), outcome
        assert "ended by SIGKILL" in str(outcome["error"])
        assert not driver.alive() and not driver.is_initialized()
        with pytest.raises(DriverLost):
            driver.nodes()  # no driver: at once, not a wait
    finally:
        driver.close()
        listener.close()


def test_a_call_before_the_connect_fails_and_an_error_in_the_child_reaches_the_caller() -> None:
    driver = RayDriver()
    try:
        driver.start()
        with pytest.raises(DriverLost, match="connecting"):  # Ray's own would say "not started"
            driver.request("get", [12345], 1.0)
        driver.initialized = True  # as once connected (no cluster here)
        with pytest.raises(KeyError):
            driver.request("get", [12345], 1.0)  # no such ref: the child's own KeyError
        assert driver.alive()
    finally:
        driver.close()
    wait_until(
        lambda: driver.process is not None and driver.process.poll() is not None, timeout=30, what="ended"
    )


def test_an_error_that_does_not_pickle_is_sent_as_its_message_and_cause() -> None:
    import ray.exceptions

    class MadeAtRunTime(ray.exceptions.RayActorError):  # as Ray's task errors are: a local class
        pass

    error = MadeAtRunTime()
    error.error_msg = "the node said no"  # what Ray's actor errors say
    error.cause = ValueError("because")  # type: ignore[attr-defined]
    relayed = portable(error)
    assert type(relayed) is ray.exceptions.RayActorError
    assert str(relayed) == "the node said no"
    assert str(relayed.cause) == "because"  # type: ignore[attr-defined]
    plain = portable(ValueError("fine"))
    assert type(plain) is ValueError
