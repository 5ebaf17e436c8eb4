"""Training job records: one JSON file per job, written by the process that runs it.

``JobStore(root)`` keeps ``<root>/<job_id>.json`` (``root`` defaults to
``$LAYERCHAIN_HOME/train/jobs``). A job runs in one process that ``create``s its record and
``update``s it as it goes (step, loss, checkpoints, status); readers (``layerchain train
status``, the gateway dashboard, the MCP server's ``training://`` resources) ``list`` and
``get`` records. Writes are atomic (a temporary file, then ``os.replace``), so a reader sees
the previous record or the next, never half of one. A record is a ``JobRecord``; the loss
history it keeps is bounded (``MAX_LOSSES`` most recent values) so a long run's file stays
small.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from layerchain.errors import ConfigError

DEFAULT_HOME = "~/.layerchain"  # LAYERCHAIN_HOME when unset (as ledger.open)
KINDS = ("finetune", "dp", "federated")
STATUSES = ("running", "done", "failed")
MAX_LOSSES = 1000  # most recent loss values a record keeps
MAX_CHECKPOINTS = 100  # most recent checkpoint paths a record keeps
JOB_ID_ENV = "LAYERCHAIN_JOB_ID"  # a job id chosen by the process that started this one (the
# MCP server's llm_train_distributed): the first ``create`` without a job_id takes it


@dataclass(frozen=True)
class JobRecord:
    """One training job as its process last wrote it.

    ``losses`` are the most recent per-step training losses (oldest first; ``step`` counts all
    steps, so ``losses[-1]`` is step ``step``'s); ``peers`` are the peer ids (or addresses) the
    job computes with; ``checkpoints`` paths of saved states, newest last; ``out`` the output
    directory; ``error`` the one-line reason of a failed job; ``extra`` small JSON-able facts a
    kind adds (method, strategy, tokens/s).
    """

    job_id: str
    kind: str  # one of KINDS
    status: str = "running"  # one of STATUSES
    started: float = 0.0  # unix seconds
    updated: float = 0.0  # unix seconds
    step: int = 0
    losses: tuple[float, ...] = ()
    peers: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    out: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown training job kind {self.kind!r}; use one of {KINDS}")
        if self.status not in STATUSES:
            raise ConfigError(f"unknown job status {self.status!r}; use one of {STATUSES}")

    @property
    def loss(self) -> float | None:
        """The latest loss, or None before the first step."""
        return self.losses[-1] if self.losses else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["losses"] = list(self.losses)
        data["peers"] = list(self.peers)
        data["checkpoints"] = list(self.checkpoints)
        data["loss"] = self.loss
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("losses", "peers", "checkpoints"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)


def jobs_home() -> Path:
    """``$LAYERCHAIN_HOME/train/jobs`` (``LAYERCHAIN_HOME`` defaulting to ``~/.layerchain``)."""
    home = Path(os.environ.get("LAYERCHAIN_HOME") or DEFAULT_HOME).expanduser()
    return home / "train" / "jobs"


class JobStore:
    """The job records under ``root`` (default ``jobs_home()``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else jobs_home()

    def create(
        self,
        kind: str,
        *,
        out: str = "",
        peers: Sequence[str] = (),
        extra: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> JobRecord:
        """A new running job's record, written; ``job_id`` defaults to ``$LAYERCHAIN_JOB_ID``
        (taken out of the environment by the first create, so a later job of this process or a
        child it starts gets its own id), else a random 12-hex id."""
        now = time.time()
        record = JobRecord(
            job_id=job_id or os.environ.pop(JOB_ID_ENV, "") or secrets.token_hex(6),
            kind=kind,
            started=now,
            updated=now,
            out=out,
            peers=tuple(peers),
            extra=dict(extra or {}),
        )
        self._check_id(record.job_id)
        self._write(record)
        return record

    def update(
        self,
        job_id: str,
        *,
        loss: float | None = None,
        checkpoint: str | None = None,
        **changes: Any,
    ) -> JobRecord:
        """The record with ``changes`` applied (fields of JobRecord), written.

        ``loss`` appends one step's loss and advances ``step`` by one (unless ``step`` is
        given); ``checkpoint`` appends a checkpoint path; ``extra`` is merged, not replaced.
        """
        record = self.get(job_id)
        if "extra" in changes:
            changes["extra"] = {**record.extra, **changes["extra"]}
        for name in ("peers", "losses", "checkpoints"):
            if name in changes:
                changes[name] = tuple(changes[name])
        record = replace(record, updated=time.time(), **changes)
        if loss is not None:
            step = changes.get("step", record.step + 1)
            losses = (*record.losses, float(loss))[-MAX_LOSSES:]
            record = replace(record, losses=losses, step=step)
        if checkpoint is not None:
            checkpoints = (*record.checkpoints, checkpoint)[-MAX_CHECKPOINTS:]
            record = replace(record, checkpoints=checkpoints)
        self._write(record)
        return record

    def get(self, job_id: str) -> JobRecord:
        """The record of ``job_id``; ConfigError naming it if there is none."""
        self._check_id(job_id)
        path = self.root / f"{job_id}.json"
        try:
            return JobRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(
                f"no training job {job_id!r} under {self.root}",
                hint="`layerchain train status` lists the jobs",
            ) from None
        except (ValueError, TypeError) as error:
            raise ConfigError(f"training job file {path} is unreadable: {error}") from None

    def list(self) -> list[JobRecord]:
        """Every readable record, newest first (unreadable files are skipped)."""
        records = []
        for path in self.root.glob("*.json") if self.root.is_dir() else ():
            try:
                records.append(JobRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError, ConfigError):
                continue
        return sorted(records, key=lambda r: r.started, reverse=True)

    def _write(self, record: JobRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{record.job_id}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record.to_json(), sort_keys=True))
        os.replace(tmp, path)

    @staticmethod
    def _check_id(job_id: str) -> None:
        if not job_id or len(job_id) > 64 or not all(c.isalnum() or c in "-_" for c in job_id):
            raise ConfigError(f"bad training job id {job_id!r}: use letters, digits, - and _")
