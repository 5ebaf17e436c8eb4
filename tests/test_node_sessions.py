"""SessionTable: cache-token admission, busy errors, idle expiry, memory freed on close."""

from __future__ import annotations

import pytest

from layerchain.errors import LimitExceeded, PeerBusy, UnknownSession
from layerchain.node.sessions import SessionTable


def test_admission_is_bounded_by_cache_tokens_and_freed_on_close():
    table = SessionTable(max_cache_tokens=100, max_sessions=10, idle_timeout_s=60)
    table.open("a", 60, cache=object())
    assert table.free_cache_tokens == 40
    with pytest.raises(PeerBusy, match="40 are free"):
        table.open("b", 50, cache=object())
    table.open("b", 40, cache=object())
    assert table.free_cache_tokens == 0
    assert table.close("a") and not table.close("a")
    assert table.free_cache_tokens == 60
    with pytest.raises(UnknownSession):
        table.get("a")


def test_session_count_limit_and_bad_requests():
    table = SessionTable(max_cache_tokens=1000, max_sessions=2, idle_timeout_s=60)
    table.open("a", 1, None)
    with pytest.raises(LimitExceeded):
        table.open("a", 1, None)  # the same id twice
    with pytest.raises(LimitExceeded):
        table.open("z", 0, None)
    table.open("b", 1, None)
    with pytest.raises(PeerBusy, match="sessions open"):
        table.open("c", 1, None)


def test_idle_sessions_expire():
    table = SessionTable(max_cache_tokens=100, max_sessions=10, idle_timeout_s=5)
    session = table.open("old", 10, object(), 0, 4)
    table.open("new", 10, object())
    session.last_used -= 10
    assert table.expire_idle() == ["old"]
    assert session.cache is None  # the KV tensors are dropped with the session
    assert len(table) == 1 and table.free_cache_tokens == 90


# ------------------------------------------------------------------- admission is not free


def test_one_session_may_not_reserve_more_than_its_cap_and_the_node_announces_the_cap():
    table = SessionTable(1000, 10, 60, max_session_tokens=250)
    assert table.admissible_tokens == 250 and table.free_cache_tokens == 1000
    with pytest.raises(LimitExceeded, match="250 cache tokens one session"):
        table.open("squat", 1000, None)  # the whole cache: refused, not admitted
    table.open("a", 250, None)
    table.open("b", 250, None, owner=1)
    table.open("c", 250, None, owner=2)
    table.open("d", 200, None, owner=3)
    assert table.admissible_tokens == 50  # what is left, below the cap


def test_the_sessions_of_one_connection_reserve_at_most_its_share_and_others_still_get_in():
    table = SessionTable(1000, 100, 60, max_session_tokens=300, max_owner_tokens=500)
    table.open("s1", 300, None, owner=7)
    table.open("s2", 200, None, owner=7)
    with pytest.raises(PeerBusy, match="one connection may hold"):
        table.open("s3", 1, None, owner=7)
    table.open("honest", 300, None, owner=8)  # another connection is admitted
    table.close("s1")
    table.open("s3", 300, None, owner=7)  # room in its share again
    assert table.free_cache_tokens == 1000 - 800


def test_a_session_that_never_steps_expires_quickly_and_failed_requests_do_not_keep_it():
    table = SessionTable(100, 10, idle_timeout_s=300, first_step_timeout_s=5)
    squat = table.open("squat", 50, object())
    used = table.open("used", 50, object())
    used.stepped(7)
    now = squat.last_used + 6
    for _ in range(3):
        table.get("squat")  # a step that then fails (wrong number, no voucher) refreshes nothing
    assert table.expire_idle(now) == ["squat"]
    assert (used.tokens, used.next_step) == (7, 1) and len(table) == 1
    assert table.expire_idle(used.last_used + 299) == []
    assert table.expire_idle(used.last_used + 301) == ["used"]


def test_admission_settings_are_checked():
    from layerchain.errors import ConfigError

    with pytest.raises(ConfigError, match="max_session_tokens"):
        SessionTable(100, 10, 60, max_session_tokens=101)
    with pytest.raises(ConfigError, match="max_cache_tokens"):
        SessionTable(0, 10, 60)


def test_a_session_belongs_to_the_connection_that_opened_it():
    table = SessionTable(100, 10, 60)
    table.open("mine", 10, object(), owner=1)
    with pytest.raises(UnknownSession):
        table.get("mine", owner=2)  # another connection cannot step it...
    assert not table.close("mine", owner=2) and len(table) == 1  # ...nor close it
    assert table.get("mine", owner=1).owner == 1
    assert table.close("mine", owner=1) and table.free_cache_tokens == 100
