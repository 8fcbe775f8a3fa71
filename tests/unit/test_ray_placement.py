"""Placement arithmetic on Ray's view of the nodes (executors/ray_placement.py): a worker fits
only where one node has both a free `agent_slot` and its memory, each pass counts what it
placed, and starts Ray's view does not show yet are counted too."""

from __future__ import annotations

import time

from orchestrator.executors.cgroups import MIB
from orchestrator.executors.ray_placement import Room


def room_with(**nodes: tuple[float, float]) -> Room:
    room = Room()
    room.free = {name: (slots, memory_mb * MIB) for name, (slots, memory_mb) in nodes.items()}
    room.read_at = time.monotonic()
    return room


def test_unknown_view_places_nothing_here() -> None:
    assert Room().place() is None  # the start itself finds out


def test_slots_and_memory_must_fit_on_one_node() -> None:
    place = room_with(a=(1, 1000), b=(2, 300)).place()
    assert place is not None
    assert place(800) is None  # on a
    reason = place(800)  # b has slots but not the memory; a has no slot left
    assert reason == "waiting for a Ray node with a free agent_slot and 800 MiB of memory"
    assert place(300) is None and place(None) is None
    assert place(None) == "waiting for a Ray node with a free agent_slot"


def test_a_start_under_way_is_counted_until_rays_view_shows_it() -> None:
    room = room_with(a=(1, 1000))
    room.starting("w1", 100)
    place = room.place()
    assert place is not None and place(None) is not None
    room.started("w1")
    place = room.place()
    assert place is not None and place(None) is not None  # placed: still counted a while
    room.starts.clear()  # what a refresh after VIEW_LAG_SECONDS does (Ray's view shows it then)
    place = room.place()
    assert place is not None and place(None) is None
