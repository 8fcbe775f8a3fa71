"""The child process of executors/ray_driver.py: the engine's Ray driver, apart from the server.

It runs each call the server sends in a thread of its own (a worker's end may wait half an hour
on its node's push), answers by number, keeps its actor handles by name and its refs by number,
and ends when the server's end of the connection closes (the server ended, kill -9 included).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import ray.exceptions

CHILD_THREADS = 256  # calls the child runs at once (a worker's end may wait half an hour on its push)


class Served:
    """The child's side: the real driver, its actor handles by name and its refs by number."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.actor_class: Any = None
        self.namespace: str | None = None
        self.actors: dict[str, Any] = {}
        self.refs: dict[int, Any] = {}  # a ref, or the error its get raises (an actor not found)
        self.asked: dict[str, Any] = {}  # a poll round's calls still unanswered, by the caller's key
        self.numbers = itertools.count(1)

    def _handle(self, name: str) -> Any:
        handle = self.actors.get(name)
        if handle is None:
            handle = self.actors[name] = self.ray.get_actor(name, namespace=self.namespace)
        return handle

    def _keep(self, ref: Any) -> int:
        number = next(self.numbers)
        self.refs[number] = ref
        return number

    def op_init(self, options: dict[str, Any]) -> str:
        from orchestrator.executors.ray_node import WorkerNode

        self.ray.init(**options)
        self.namespace = options.get("namespace")
        self.actor_class = self.ray.remote(WorkerNode)
        node = self.ray._private.worker._global_node
        return str(node.session_name) if node is not None else ""

    def op_nodes(self) -> Any:
        return self.ray.nodes()  # type: ignore[no-untyped-call]

    def op_resources(self) -> Any:
        from ray._private import state

        return state.available_resources_per_node()  # type: ignore[no-untyped-call]

    def op_actor_info(self, name: str) -> dict[str, Any]:
        """The fields of the actor's row ray_placement.py reads, as plain values."""
        from ray._private import state

        row: dict[str, Any] = state.actors(self._handle(name)._actor_id.hex())
        address = row.get("Address") or {}
        node, port = address.get("NodeID"), address.get("Port")
        return {
            "State": None if row.get("State") is None else str(row["State"]),
            "Address": {"NodeID": None if node is None else str(node), "Port": port and int(port)},
        }

    def op_get_actor(self, name: str, namespace: str | None) -> None:
        self.actors[name] = self.ray.get_actor(name, namespace=namespace or self.namespace)

    def op_kill(self, name: str, no_restart: bool) -> None:
        self.ray.kill(self._handle(name), no_restart=no_restart)

    def op_create(self, options: dict[str, Any]) -> None:
        self.actors[options["name"]] = self.actor_class.options(**options).remote()

    def op_call(self, name: str, method: str, args: tuple[Any, ...]) -> int:
        try:
            handle = self._handle(name)
        except ValueError:  # gone (a driver started after it died): as a dead actor's handle answers
            return self._keep(self.ray.exceptions.ActorDiedError())
        return self._keep(getattr(handle, method).remote(*args))

    def op_get(self, numbers: list[int], timeout: float | None) -> list[Any]:
        refs = [self.refs[n] for n in numbers]
        for ref in refs:
            if isinstance(ref, BaseException):
                raise ref
        values: list[Any] = self.ray.get(refs, timeout=timeout)
        return values

    def op_wait(
        self, numbers: list[int], num_returns: int, timeout: float | None
    ) -> tuple[list[int], list[int]]:
        failed = [n for n in numbers if isinstance(self.refs[n], BaseException)]
        live = {self.refs[n]: n for n in numbers if n not in failed}
        if len(failed) >= num_returns or not live:
            return failed, list(live.values())
        ready, pending = self.ray.wait(list(live), num_returns=num_returns - len(failed), timeout=timeout)
        return failed + [live[r] for r in ready], [live[r] for r in pending]

    def op_round(
        self, asks: list[tuple[str, str, str, tuple[Any, ...]]], keys: list[str], timeout: float
    ) -> tuple[dict[str, tuple[bool, Any]], list[str]]:
        """A watcher's round in one call: make the new calls, wait (bounded) for those of `keys`,
        and answer each that ended, by key; the others stay under way for a later round, and
        calls under way for a key no longer in `keys` are dropped."""
        for key, name, method, args in asks:
            try:
                self.asked[key] = getattr(self._handle(name), method).remote(*args)
            except ValueError:  # gone (a driver started after it died)
                self.asked[key] = self.ray.exceptions.ActorDiedError()
        wanted = set(keys)
        for key in [key for key in self.asked if key not in wanted]:
            del self.asked[key]
        answers: dict[str, tuple[bool, Any]] = {}
        live: dict[Any, str] = {}
        for key in keys:
            call = self.asked.get(key)
            if isinstance(call, BaseException):
                answers[key] = (False, portable(self.asked.pop(key)))
            elif call is not None:
                live[call] = key
        ready: list[Any] = []
        pending: list[Any] = []
        if live:
            ready, pending = self.ray.wait(list(live), num_returns=len(live), timeout=timeout)
        for ref in ready:
            key = live[ref]
            del self.asked[key]
            try:
                answers[key] = (True, self.ray.get(ref))
            except Exception as exc:
                answers[key] = (False, portable(exc))
        return answers, [live[ref] for ref in pending]


def portable(exc: BaseException) -> BaseException:
    """The exception as the server can unpickle it: Ray's task errors wrap the node's own
    exception in a class made at run time; then the same message, and the cause as text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        pass
    cause = getattr(exc, "cause", None)
    errors = ray.exceptions
    relayed = errors.RayActorError() if isinstance(exc, errors.RayActorError) else errors.RayError()
    relayed.args = (str(exc)[:4000],)
    if isinstance(relayed, errors.RayActorError):
        relayed.error_msg = relayed.args[0]  # what its str() says
    if cause is not None:
        relayed.cause = RuntimeError(str(cause)[:4000])  # type: ignore[attr-defined]
    return relayed


def serve(fd: int) -> None:
    """The child's loop: run each call in a thread of its own (a get may wait long), answer by
    number; the server's end (EOF) ends the child."""
    for ignored in (signal.SIGINT, signal.SIGTERM):  # the server's to get (a terminal's ^C, a stop)
        signal.signal(ignored, signal.SIG_IGN)  # this process ends with its connection to it
    connection = Connection(fd)
    served = Served()
    sending = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=CHILD_THREADS, thread_name_prefix="call")

    def run(number: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            answer: tuple[int, bool, Any] = (number, True, getattr(served, f"op_{op}")(*args))
        except BaseException as exc:  # every failure is the caller's to see
            answer = (number, False, portable(exc))
        with sending, contextlib.suppress(OSError):
            try:
                connection.send(answer)  # pickled whole before a byte is sent
            except Exception as exc:  # an answer that does not pickle: the caller must not wait on
                connection.send((number, False, ray.exceptions.RayError(f"{op}: its answer: {exc}")))

    while True:
        try:
            number, op, args = connection.recv()
        except (EOFError, OSError):
            os._exit(0)
        if op == "release":
            for released in args[0]:
                served.refs.pop(released, None)
            continue
        pool.submit(run, number, op, args)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
