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
