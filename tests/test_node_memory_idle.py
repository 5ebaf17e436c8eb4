"""``node.memory``: a node that served sheds again what serving paged back in (``shed_when_idle``),
only once no session has been open for a while and enough came back; its p2pd gets a lower GOGC."""

from __future__ import annotations

import asyncio

import pytest

from layerchain.node import memory
from layerchain.node.memory import IdlePolicy, file_rss_mb, shed_when_idle

FAST = IdlePolicy(period_s=0.01, quiet_s=0.05, regrown_mb=8.0)


class Machine:
    """File pages that serving grows and a shed drops; a clock the test moves."""

    def __init__(self) -> None:
        self.file_mb = 12.0
        self.now = 0.0
        self.sheds: list[float] = []  # the clock at each shed
        self.busy = False

    def shed(self) -> float:
        self.sheds.append(self.now)
        dropped, self.file_mb = self.file_mb - 12.0, 12.0
        return dropped


@pytest.fixture
def machine(monkeypatch):
    m = Machine()
    monkeypatch.setattr(memory, "file_rss_mb", lambda: m.file_mb)
    monkeypatch.setattr(memory, "shed_startup_memory", m.shed)
    return m


async def _run_for(machine: Machine, steps: int, change=None) -> None:
    """Run the shedder while the clock advances 0.01 s per step; ``change(step)`` first."""
    task = asyncio.create_task(shed_when_idle(lambda: machine.busy, FAST, lambda: machine.now))
    try:
        for step in range(steps):
            if change is not None:
                change(step)
            machine.now += 0.01
            await asyncio.sleep(0.012)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_sheds_once_pages_came_back_and_no_session_was_open_for_quiet_s(machine):
    def serve(step: int) -> None:
        machine.busy = step < 10  # a session for the first 0.1 s
        if step < 10:
            machine.file_mb = 12.0 + 3.2 * step  # serving pages code back in: +29 MiB

    asyncio.run(_run_for(machine, 40, serve))
    assert len(machine.sheds) == 1
    assert machine.sheds[0] >= 0.1  # not while the session was open
    assert machine.file_mb == 12.0


def test_never_sheds_while_a_session_is_open(machine):
    machine.busy, machine.file_mb = True, 60.0
    asyncio.run(_run_for(machine, 20))
    assert machine.sheds == []


def test_waits_quiet_s_after_the_last_session(machine):
    machine.file_mb = 60.0
    slow = IdlePolicy(period_s=0.01, quiet_s=10.0, regrown_mb=8.0)  # quiet longer than the run

    async def run() -> None:
        task = asyncio.create_task(shed_when_idle(lambda: False, slow, lambda: machine.now))
        for _ in range(20):
            machine.now += 0.01
            await asyncio.sleep(0.012)
        task.cancel()

    asyncio.run(run())
    assert machine.sheds == []


def test_does_not_shed_for_little(machine):
    machine.file_mb = 12.0 + FAST.regrown_mb / 2  # came back, but less than regrown_mb
    asyncio.run(_run_for(machine, 20))
    assert machine.sheds == []


def test_file_rss_is_read_from_this_process():
    assert file_rss_mb() > 1.0  # the interpreter's own code, at least


def test_p2pd_gets_a_lower_gogc_unless_one_is_set():
    env: dict[str, str] = {}
    memory.tune_p2pd_env(env)
    assert env == {"GOGC": memory.P2PD_GOGC}
    mine = {"GOGC": "200"}
    memory.tune_p2pd_env(mine)
    assert mine == {"GOGC": "200"}
