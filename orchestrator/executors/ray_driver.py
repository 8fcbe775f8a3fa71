"""The Ray driver in a process of its own, so that no failure of the cluster can end the server.

A Ray driver (`ray.init`) is Ray's C++ core worker inside the calling process, and that core
worker ends its whole process on some failures of the cluster: a head restarted as a new cluster
(no GCS fault tolerance; KubeRay's default when a head pod restarts) answers the driver's next
call with `WrongClusterID`, and Ray's own check aborts the process (SIGABRT). With the engine
inside an API process, the API would go with it. So the executor's driver runs in a child process
(`python -m orchestrator.executors.ray_driver_child`), and `RayDriver` gives the executor the part of
Ray's API it uses: its actors stand for the child's by name (all of ours are named), its refs by
number. When the child ends, every call waiting on it fails with `DriverLost` and the executor
starts a new child, which connects to whatever cluster answers at the address then.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import ray.exceptions

log = logging.getLogger(__name__)


class DriverLost(ray.exceptions.RayError):
    """The driver process ended (Ray aborted it, or it was killed) while a call waited on it, or
    the call was made without one: the executor starts a new one."""


class Ref:
    """One of the child's object refs, by number; dropped there once dropped here."""

    __slots__ = ("driver", "generation", "number")

    def __init__(self, driver: RayDriver, number: int, generation: int) -> None:
        self.driver, self.number, self.generation = driver, number, generation

    def __del__(self) -> None:
        self.driver.released.append((self.generation, self.number))


class Method:
    def __init__(self, driver: RayDriver, actor: str, method: str) -> None:
        self.driver, self.actor, self.method = driver, actor, method

    def remote(self, *args: Any) -> Ref:
        generation = self.driver.generation  # a child that replaced it meanwhile: the ref is stale
        return Ref(self.driver, self.driver.request("call", self.actor, self.method, args), generation)


class ActorRef:
    """A named actor of the cluster (the child finds it by name when it has no handle to it)."""

    def __init__(self, driver: RayDriver, name: str) -> None:
        self.driver, self.name = driver, name

    def __getattr__(self, method: str) -> Method:
        if method.startswith("_"):
            raise AttributeError(method)
        return Method(self.driver, self.name, method)


class Creation:
    def __init__(self, driver: RayDriver, options: dict[str, Any]) -> None:
        self.driver, self.options = driver, options

    def remote(self) -> ActorRef:
        self.driver.request("create", self.options)
        return ActorRef(self.driver, str(self.options["name"]))


class ActorClass:
    """The worker's actor class (orchestrator.executors.ray_node.WorkerNode) in the child."""

    def __init__(self, driver: RayDriver) -> None:
        self.driver = driver

    def options(self, **options: Any) -> Creation:
        return Creation(self.driver, options)


class RayDriver:
    """A Ray driver in a child process, with the calls of Ray's API the executor makes."""

    exceptions = ray.exceptions

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: Connection | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.numbers = itertools.count(1)
        self.pending: dict[int, tuple[int, Future[Any]]] = {}  # number -> (generation, answer)
        self.released: collections.deque[tuple[int, int]] = collections.deque()
        self.initialized = False
        self.ended: str | None = "not started"
        self.closed = False  # the executor closed it: no successor will come

    # ------------------------------------------------------------ the child process

    def start(self) -> None:
        """A new child (the one before, if any, has ended)."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.executors.ray_driver_child", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
            connection = Connection(os.dup(ours.fileno()))
        with self.lock:
            self.generation += 1
            self.connection, self.process = connection, process
            self.initialized, self.ended = False, None
            generation = self.generation
        threading.Thread(
            target=self._receive, args=(connection, process, generation), name="ray-driver", daemon=True
        ).start()

    def alive(self) -> bool:
        return self.ended is None

    def close(self) -> None:
        self.closed = True
        self.stop()

    def stop(self) -> None:
        """End the child (its calls fail DriverLost); the next `init` starts another."""
        with self.lock:
            process, self.initialized = self.process, False
            if self.ended is None:
                self.ended = "the Ray driver process was stopped"
        if process is not None and process.poll() is None:
            process.kill()

    def _receive(self, connection: Connection, process: subprocess.Popen[bytes], generation: int) -> None:
        while True:
            try:
                number, ok, value = connection.recv()
            except Exception:  # EOF, a closed socket, an answer that does not unpickle: ended
                process.kill()
                break
            with self.lock:
                _, future = self.pending.pop(number, (0, None))
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        code = process.wait()
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        why = f"ended by {name}" if code < 0 else f"exited with status {code}"
        reason = f"the Ray driver process {why}"
        with self.lock:
            if generation == self.generation:
                self.ended, self.initialized = reason, False
            waiting = [n for n, (g, _) in self.pending.items() if g == generation]
            futures = [self.pending.pop(n)[1] for n in waiting]
        connection.close()
        for future in futures:
            future.set_exception(DriverLost(reason))

    def request(self, op: str, *args: Any) -> Any:
        """Ask the child; waits for its answer (bounded by the call's own timeout there)."""
        future: Future[Any] = Future()
        with self.lock:
            if self.ended is not None or self.connection is None:
                raise DriverLost(self.ended or "no Ray driver")
            if op != "init" and not self.initialized:  # Ray's calls would fail "not started"
                raise DriverLost("the Ray driver process is connecting")
            number = next(self.numbers)
            self.pending[number] = (self.generation, future)
            released = self._drain_released()
            try:
                if released:
                    self.connection.send((0, "release", (released,)))
                self.connection.send((number, op, args))
            except (OSError, ValueError) as exc:
                self.pending.pop(number, None)
                raise DriverLost(f"the Ray driver process is gone: {exc}") from None
        return future.result()

    def _drain_released(self) -> list[int]:
        numbers = []
        while self.released:
            generation, number = self.released.popleft()
            if generation == self.generation:
                numbers.append(number)
        return numbers

    def ref(self, number: int) -> Ref:
        return Ref(self, number, self.generation)

    def _numbers(self, refs: list[Ref]) -> list[int]:
        if any(ref.generation != self.generation for ref in refs):
            raise DriverLost("a ref of a Ray driver process that has ended")
        return [ref.number for ref in refs]

    # ------------------------------------------------------------ Ray's API, as the executor uses it

    def is_initialized(self) -> bool:
        return self.initialized and self.alive()

    def init(self, **options: Any) -> str:
        """Connect the child (a new one if the last has ended); returns the cluster's session."""
        if self.closed:
            raise DriverLost("the Ray driver was closed")
        if self.process is None or self.process.poll() is not None or self.ended is not None:
            self.stop()
            self.start()
        try:
            session: str = self.request("init", options)
        except BaseException:
            self.stop()  # a driver whose connect failed is not tried again: the next is new
            raise
        with self.lock:
            self.initialized = self.ended is None
        return session

    def remote(self, cls: type) -> ActorClass:
        return ActorClass(self)

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.request("nodes")
        return nodes

    def available_resources_per_node(self) -> dict[str, dict[str, float]]:
        per_node: dict[str, dict[str, float]] = self.request("resources")
        return per_node

    def actor_info(self, actor: ActorRef) -> dict[str, Any]:
        """The GCS's actor table row of the actor (a DeveloperAPI: ray._private.state)."""
        info: dict[str, Any] = self.request("actor_info", actor.name)
        return info

    def get_actor(self, name: str, namespace: str | None = None) -> ActorRef:
        self.request("get_actor", name, namespace)
        return ActorRef(self, name)

    def kill(self, actor: ActorRef, *, no_restart: bool = True) -> None:
        self.request("kill", actor.name, no_restart)

    def get(self, refs: Ref | list[Ref], *, timeout: float | None = None) -> Any:
        if isinstance(refs, Ref):
            return self.request("get", self._numbers([refs]), timeout)[0]
        return self.request("get", self._numbers(refs), timeout)

    def poll_round(
        self, asks: list[tuple[str, ActorRef, str, tuple[Any, ...]]], keys: list[str], timeout: float
    ) -> tuple[dict[str, tuple[bool, Any]], list[str]]:
        """A watcher's round in one call (one round trip for all its workers, not two each):
        new calls `(key, actor, method, args)`, then the answers, by key, of those of `keys` that
        ended within `timeout` (`(True, value)` or `(False, exception)`), and the keys still under
        way. A key under way that is in neither (a new driver) is to be asked again."""
        calls = [(key, actor.name, method, args) for key, actor, method, args in asks]
        answers: tuple[dict[str, tuple[bool, Any]], list[str]] = self.request("round", calls, keys, timeout)
        return answers

    def wait(
        self, refs: list[Ref], *, num_returns: int = 1, timeout: float | None = None
    ) -> tuple[list[Ref], list[Ref]]:
        by_number = {ref.number: ref for ref in refs}
        ready, pending = self.request("wait", self._numbers(refs), num_returns, timeout)
        return [by_number[n] for n in ready], [by_number[n] for n in pending]
