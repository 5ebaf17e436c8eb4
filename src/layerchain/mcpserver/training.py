"""Training jobs the MCP server starts: ``layerchain train finetune|dp ...`` processes.

A job is its own process (training runs for minutes to hours, longer than a tool call, and
must not share the server's event loop or cores' worth of torch threads with inference).
The handshake (``start``):

1. the server picks the job id and writes a "running" record for it in the ``JobStore``
   (so ``training://jobs`` shows the job at once), with the command and its log file;
2. it starts the command with ``LAYERCHAIN_JOB_ID`` set to that id: the process's
   ``JobStore.create`` takes it (``train.jobs.JOB_ID_ENV``) and from then on the process
   writes the record itself (loss, checkpoints, status);
3. it waits up to ``start_wait_s`` for the process to fail early (a bad flag or data
   file, exit code != 0): that failure is the tool call's error, one line from the log.

The server never writes a record while its process runs (the process owns it then); once a
process has exited without marking its record done or failed (killed, crashed before its
first write), ``poll`` marks it failed with the exit code and the log's last line. Jobs
still running when the server closes are stopped (SIGTERM, then SIGKILL to the job's
process group): they are its children.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.errors import ConfigError, LayerchainError
from layerchain.train.jobs import JOB_ID_ENV, JobStore

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # a job asked to stop (SIGTERM) is killed after this many seconds
POLL_S = 0.1  # how often start() looks at a job that is starting, s


@dataclass(frozen=True)
class StartedJob:
    """A training process the server started."""

    job_id: str
    kind: str  # train.jobs.KINDS
    pid: int
    command: tuple[str, ...]  # the whole argv
    log: str  # its stdout and stderr

    def to_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, "status": "running",
                "pid": self.pid, "command": list(self.command), "log": self.log}


def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log file (at most ``limit`` characters), "" if none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


class TrainingJobs:
    """The training processes this server started, and their records in ``store``."""

    def __init__(self, program: Sequence[str], store: JobStore, start_wait_s: float = 3.0) -> None:
        self.program = tuple(program)
        self.store = store
        self.start_wait_s = start_wait_s
        self.logs = store.root.parent / "logs"  # $LAYERCHAIN_HOME/train/logs/<job_id>.log
        self._procs: dict[str, tuple[StartedJob, subprocess.Popen[bytes]]] = {}

    async def start(self, kind: str, args: Sequence[str], *, job_id: str | None = None,
                    out: str = "") -> StartedJob:
        """Start ``program + args`` as job ``kind`` (see the module's docstring), with id
        ``job_id`` (default: a random one); ConfigError with the process's last line when it
        fails within ``start_wait_s``."""
        job_id = job_id or secrets.token_hex(6)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{job_id}.log"
        command = (*self.program, *args)
        self.store.create(kind, out=out, job_id=job_id,
                          extra={"command": list(command), "log": str(log_path),
                                 "started_by": "mcp"})
        try:
            with open(log_path, "wb") as out_file:
                proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=out_file, stderr=subprocess.STDOUT,
                    env={**os.environ, JOB_ID_ENV: job_id}, start_new_session=True,
                )
        except OSError as error:  # no such program, not executable
            message = f"cannot start the training command {command[0]}: {error.strerror or error}"
            self.store.update(job_id, status="failed", error=message)
            raise ConfigError(message) from None
        job = StartedJob(job_id, kind, proc.pid, command, str(log_path))
        self._procs[job_id] = (job, proc)
        deadline = time.monotonic() + self.start_wait_s
        while time.monotonic() < deadline and proc.poll() is None:
            await asyncio.sleep(POLL_S)
        if proc.poll() not in (None, 0):
            self.poll()
            raise ConfigError(
                f"training job {job_id} failed at start (exit {proc.returncode}): "
                f"{last_line(log_path) or 'no output'}", hint=f"its log: {log_path}")
        return job

    def poll(self) -> None:
        """Mark the records of jobs whose process exited without ending its record as
        failed (exit code and the log's last line); forget exited processes."""
        for job_id, (job, proc) in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._procs[job_id]
            try:
                record = self.store.get(job_id)
            except LayerchainError:
                continue
            if record.status == "running":
                reason = last_line(Path(job.log)) or "no output"
                self.store.update(job_id, status="failed",
                                  error=f"the process exited with code {code}: {reason}")

    def running(self) -> list[StartedJob]:
        return [job for job, proc in self._procs.values() if proc.poll() is None]

    async def close(self) -> None:
        """Stop the jobs still running (SIGTERM to each job's process group, SIGKILL after
        ``STOP_GRACE_S``) and mark their records."""
        procs = [proc for _, proc in self._procs.values() if proc.poll() is None]
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self.poll()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session: the group's id is the job's pid
    except ProcessLookupError:
        pass
