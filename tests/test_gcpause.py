"""The CLI's pause of garbage collection while a command loads (layerchain.gcpause)."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import pytest

from layerchain import gcpause


@pytest.fixture()
def restore_gc():
    yield
    gcpause.resume()  # whatever a test left paused
    gc.unfreeze()
    gc.enable()


def test_pause_turns_collection_off_and_resume_freezes_and_turns_it_on(restore_gc):
    frozen_before = gc.get_freeze_count()
    gcpause.pause(limit_s=60)
    assert not gc.isenabled() and gcpause.paused()
    gcpause.pause(limit_s=60)  # a second pause changes nothing
    gcpause.resume()
    assert gc.isenabled() and not gcpause.paused()
    assert gc.get_freeze_count() > frozen_before  # what lived is out of every collection
    gcpause.resume()  # not paused: nothing
    assert gc.isenabled()


def test_a_command_that_never_resumes_collects_again_after_the_limit(restore_gc):
    gcpause.pause(limit_s=0.05)
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled() and not gcpause.paused()


def test_collection_turned_off_by_the_user_stays_off(restore_gc):
    gc.disable()
    gcpause.pause(limit_s=0.01)
    time.sleep(0.1)
    assert not gc.isenabled() and not gcpause.paused()


def test_the_cli_runs_its_command_with_collection_paused_then_resumes():
    """In a real `layerchain` process: paused while the command starts, and back on
    (by the timer) for a command that never says it is loaded."""
    code = (
        "import gc, sys, time\n"
        "from layerchain import gcpause\n"
        "gcpause.PAUSE_LIMIT_S = 0.5\n"
        "import layerchain.cli.main as m\n"
        "def probe():\n"
        "    print('at start', gc.isenabled(), flush=True)\n"
        "    time.sleep(1.5)\n"
        "    print('later', gc.isenabled(), flush=True)\n"
        "m._app.command('probe')(probe)\n"
        "m._COMMANDS['probe'] = 'layerchain.cli.main'\n"
        "m._register = lambda modules: None\n"
        "sys.argv = ['layerchain', 'probe']\n"
        "m.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["at start False", "later True"]
