"""The training job store: records round-trip, updates accumulate, bad ids are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerchain.errors import ConfigError
from layerchain.train.jobs import MAX_LOSSES, JobRecord, JobStore, jobs_home


def test_create_update_get_list(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create("finetune", out="/x", peers=["a", "b"], extra={"method": "prompt"})
    assert store.get(job.job_id) == job
    assert job.status == "running" and job.loss is None
    store.update(job.job_id, loss=2.5)
    store.update(job.job_id, loss=1.5, checkpoint="/x/ckpt-2", extra={"tokens_per_s": 3.0})
    done = store.update(job.job_id, status="done")
    assert done.step == 2 and done.losses == (2.5, 1.5) and done.loss == 1.5
    assert done.checkpoints == ("/x/ckpt-2",)
    assert done.extra == {"method": "prompt", "tokens_per_s": 3.0}
    assert store.get(job.job_id) == done
    other = store.create("dp")
    assert [r.job_id for r in store.list()] == [other.job_id, job.job_id]
    data = json.loads((tmp_path / f"{job.job_id}.json").read_text())
    assert data["loss"] == 1.5 and data["peers"] == ["a", "b"]


def test_losses_are_bounded(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create("dp")
    for i in range(MAX_LOSSES + 5):
        job = store.update(job.job_id, loss=float(i))
    assert job.step == MAX_LOSSES + 5 and len(job.losses) == MAX_LOSSES
    assert job.losses[-1] == MAX_LOSSES + 4


def test_bad_input_is_a_config_error(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(ConfigError, match="no training job"):
        store.get("missing")
    with pytest.raises(ConfigError, match="bad training job id"):
        store.get("../etc/passwd")
    with pytest.raises(ConfigError, match="unknown training job kind"):
        store.create("magic")
    with pytest.raises(ConfigError, match="unknown job status"):
        JobRecord(job_id="x", kind="dp", status="weird")
    (tmp_path / "junk.json").write_text("{not json")
    assert store.list() == []


def test_home_follows_layerchain_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path))
    assert jobs_home() == tmp_path / "train" / "jobs"
    assert JobStore().root == tmp_path / "train" / "jobs"
