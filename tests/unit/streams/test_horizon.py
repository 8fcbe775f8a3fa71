"""The PostgreSQL delivery horizon and the change mark, as pure logic: rows above the newest ids of
a snapshot are delivered only once every transaction open at that snapshot has ended (or has been
open past MAX_HORIZON_WAIT_SECONDS). The real-database side is in test_wakeups.py."""

from __future__ import annotations

from orchestrator.streams.horizon import MAX_HORIZON_WAIT_SECONDS, ChangeMark, Horizon, in_progress

A, B = frozenset({"901"}), frozenset({"902"})


def test_without_open_transactions_everything_seen_is_safe() -> None:
    horizon = Horizon(is_postgres=True)
    assert horizon.advance(10, 20, frozenset(), now=0.0) == (10, 20)
    assert not horizon.waiting
    assert horizon.advance(11, 25, frozenset(), now=1.0) == (11, 25)


def test_rows_are_held_back_until_the_transactions_open_then_end() -> None:
    horizon = Horizon(is_postgres=True)
    horizon.advance(5, 5, frozenset(), now=0.0)
    # Transaction A is open: it may still commit an id below 10 / 20.
    assert horizon.advance(10, 20, A, now=1.0) == (5, 5)
    assert horizon.waiting and horizon.waiting_on == A
    # B opened meanwhile, A still open: still held back, and the candidate is not replaced.
    assert horizon.advance(12, 22, A | B, now=2.0) == (5, 5)
    # A has ended, B is open: the ids A's snapshot saw are safe; the newer ones wait for B.
    assert horizon.advance(12, 22, B, now=3.0) == (10, 20)
    assert horizon.waiting and horizon.waiting_on == B
    assert horizon.advance(12, 22, frozenset(), now=4.0) == (12, 22)
    assert not horizon.waiting


def test_a_stuck_transaction_stops_holding_rows_back() -> None:
    horizon = Horizon(is_postgres=True)
    assert horizon.advance(10, 20, A, now=100.0) == (0, 0)
    assert horizon.advance(10, 20, A, now=100.0 + MAX_HORIZON_WAIT_SECONDS) == (0, 0)
    assert horizon.advance(10, 20, A, now=100.0 + MAX_HORIZON_WAIT_SECONDS + 0.5) == (10, 20)


def test_the_horizon_never_moves_back() -> None:
    horizon = Horizon(is_postgres=True)
    horizon.advance(50, 60, frozenset(), now=0.0)
    assert horizon.advance(10, 20, frozenset(), now=1.0) == (50, 60)
    horizon.advance(40, 70, A, now=2.0)
    assert horizon.advance(40, 70, frozenset(), now=3.0) == (50, 70)


def test_in_progress_reads_a_pg_snapshot() -> None:
    assert in_progress("100:100:") == frozenset()
    assert in_progress("100:105:100,102,104") == {"100", "102", "104"}


def test_the_change_mark_moves_with_its_counters_or_an_ended_transaction() -> None:
    mark = ChangeMark((1, 2, 3), A | B)
    assert not ChangeMark((1, 2, 3), A | B).moved_since(mark)
    assert not ChangeMark((1, 2, 3), A | B | {"903"}).moved_since(mark), "a new transaction is no change"
    assert ChangeMark((1, 2, 3), A).moved_since(mark), "B has ended"
    for counters in [(2, 2, 3), (1, 3, 3), (1, 2, 2)]:
        assert ChangeMark(counters, A | B).moved_since(mark)
