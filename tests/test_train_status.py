"""Training jobs are visible: ``layerchain train status`` (text and --json) and the gateway's
``GET /api/train/jobs`` list the job records with their peers, loss and checkpoints."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.train.jobs import JobStore


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobStore:
    """A job store under a fresh LAYERCHAIN_HOME holding a finished dp job and a failed one."""
    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path / "home"))
    store = JobStore()
    done = store.create("dp", out="/ck/run1", peers=["peerA"], extra={"run_id": "run1"},
                        job_id="dp-done")
    store.update(done.job_id, loss=2.5, checkpoint="/ck/run1/step-000001-aaaaaaaa.pt")
    store.update(done.job_id, loss=1.25, peers=["peerA", "peerB"],
                 checkpoint="/ck/run1/step-000002-aaaaaaaa.pt")
    store.update(done.job_id, status="done")
    failed = store.create("federated", job_id="fed-failed")
    store.update(failed.job_id, status="failed", error="only 1 of 2 peers joined run 'x'")
    return store


def test_status_json_lists_jobs_with_peers_loss_and_checkpoints(jobs: JobStore) -> None:
    result = CliRunner().invoke(app, ["train", "status", "--json"])
    assert result.exit_code == 0, result.output
    listed = {job["job_id"]: job for job in json.loads(result.output)["jobs"]}
    assert set(listed) == {"dp-done", "fed-failed"}
    done = listed["dp-done"]
    assert (done["kind"], done["status"], done["step"], done["loss"]) == ("dp", "done", 2, 1.25)
    assert done["losses"] == [2.5, 1.25] and done["peers"] == ["peerA", "peerB"]
    assert done["checkpoints"][-1] == "/ck/run1/step-000002-aaaaaaaa.pt"
    assert listed["fed-failed"]["error"].startswith("only 1 of 2 peers")


def test_status_text_shows_one_row_per_job_and_errors(jobs: JobStore) -> None:
    result = CliRunner().invoke(app, ["train", "status"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:] if line.strip()}
    assert rows["dp-done"].split()[1:5] == ["dp", "done", "2", "1.2500"]
    assert rows["dp-done"].split()[5] == "2"  # peers
    assert rows["dp-done"].endswith("/ck/run1/step-000002-aaaaaaaa.pt")
    assert "error: only 1 of 2 peers" in result.output


def test_status_with_no_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["train", "status"])
    assert result.exit_code == 0 and "no training jobs" in result.output
    assert json.loads(CliRunner().invoke(app, ["train", "status", "--json"]).output) == {
        "jobs": []}


def test_train_dp_without_peers_is_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    result = CliRunner().invoke(app, ["train", "dp", "--data", str(data)])
    assert result.exit_code == 1
    assert "train dp needs the swarm's DHT" in result.output
    bad = CliRunner().invoke(app, ["train", "dp", "--data", str(data), "--initial-peers",
                                   "/ip4/127.0.0.1/tcp/1/p2p/X", "--shard", "3/2"])
    assert bad.exit_code == 1 and "outside 0..1" in bad.output


def test_gateway_lists_training_jobs(jobs: JobStore, tiny_model_dir, tmp_path: Path) -> None:
    from gateway_harness import memory_gateway

    from layerchain.gateway import KeyStore

    model = str(tiny_model_dir("llama", tokenizer=True))

    async def fetch(path: Path) -> tuple[int, dict, int]:
        async with memory_gateway(model, path) as (client, _):
            page = await client.get("/")
            reply = await client.get("/api/train/jobs")
            return reply.status_code, reply.json(), page.status_code

    status, body, page = asyncio.run(fetch(tmp_path / "open"))
    assert status == 200 and page == 200
    listed = {job["job_id"]: job for job in body["jobs"]}
    assert listed["dp-done"]["loss"] == 1.25 and listed["dp-done"]["peers"] == ["peerA", "peerB"]
    assert listed["fed-failed"]["status"] == "failed"

    keyed = tmp_path / "keyed"
    keyed.mkdir()
    KeyStore(keyed / "keys.sqlite").create("acme", balance=1)
    status, body, _ = asyncio.run(fetch(keyed))
    assert status == 401 and "jobs" not in body  # with keys on, jobs need a key
