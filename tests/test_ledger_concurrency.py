"""The ledger shared by processes: racing redemptions and writers killed mid-redemption.

Every child is a fresh ``python -c`` process on the same SQLite file, bounded in time and
killed by the test if it overruns.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from layerchain.ledger import LedgerConfig, Voucher, open_ledger, sign_voucher
from layerchain.market.wallet import Wallet

# A child: wait for the go file, redeem its vouchers in order, print one JSON line each.
RACER = r"""
import json, os, sys, time, msgpack
from layerchain.errors import LayerchainError
from layerchain.ledger import open_ledger
path, vouchers, ready, go = sys.argv[1:5]
ledger = open_ledger(path)
items = msgpack.unpackb(open(vouchers, "rb").read())
open(ready, "w").close()
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.001)
for data in items:
    try:
        print(json.dumps({"credited": ledger.redeem(data)}), flush=True)
    except LayerchainError as error:
        print(json.dumps({"error": type(error).__name__}), flush=True)
"""

# A writer: redeem vouchers from the channel's nonce on, acknowledging each returned call.
WRITER = r"""
import sys, msgpack
from layerchain.ledger import open_ledger
path, vouchers, channel_id = sys.argv[1:4]
ledger = open_ledger(path)
items = msgpack.unpackb(open(vouchers, "rb").read())
start = ledger.channel(channel_id).nonce
print("READY", flush=True)
for nonce in range(start + 1, len(items) + 1):
    credited = ledger.redeem(items[nonce - 1])
    print(f"ACK {nonce} {credited}", flush=True)
"""


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _race(tmp_path: Path, ledger_path: Path, voucher_lists: list[list[bytes]]) -> list[list[dict]]:
    """Run one racer per list, released together; return each racer's JSON lines."""
    go = tmp_path / "go"
    procs = []
    try:
        for i, items in enumerate(voucher_lists):
            vfile = tmp_path / f"v{i}.bin"
            vfile.write_bytes(msgpack.packb(items))
            procs.append(subprocess.Popen(
                [sys.executable, "-c", RACER, str(ledger_path), str(vfile),
                 str(tmp_path / f"ready{i}"), str(go)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
            ))
        deadline = time.time() + 60
        while not all((tmp_path / f"ready{i}").exists() for i in range(len(procs))):
            assert time.time() < deadline, "racers did not start"
            assert all(p.poll() is None for p in procs), procs[0].stderr.read().decode()
            time.sleep(0.01)
        go.touch()
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
            outputs.append([json.loads(line) for line in out.decode().splitlines()])
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def funded(tmp_path):
    """A ledger file with one open channel of deposit 1000 from ``payer`` to ``payee``."""
    payer, payee = Wallet.generate(), Wallet.generate()
    path = tmp_path / "shared.sqlite"
    with open_ledger(path, LedgerConfig(dispute_window_s=0)) as ledger:
        ledger.deposit(payer, 5000)
        cid = ledger.open_channel(payer, payee.address, 1000)
        domain = ledger.domain_separator
    return path, payer, payee, cid, domain


@pytest.mark.slow
def test_eight_processes_redeeming_the_same_voucher_credit_once(tmp_path, funded):
    path, payer, payee, cid, domain = funded
    voucher = sign_voucher(payer, Voucher(cid, 1, 700), domain)
    outputs = _race(tmp_path, path, [[voucher]] * 8)
    credits = sorted(line["credited"] for lines in outputs for line in lines)
    assert credits == [0] * 7 + [700]
    with open_ledger(path) as ledger:
        assert ledger.balance(payee.address) == 700
        assert ledger.channel(cid).redeemed == 700
        assert sum(1 for e in ledger.journal() if e.kind == "redeem") == 1
        assert ledger.verify().ok


@pytest.mark.slow
def test_racing_vouchers_never_credit_above_the_deposit(tmp_path, funded):
    path, payer, payee, cid, domain = funded
    # nonces 1..30 up to 900 credits, plus forged ones above the 1000 deposit
    valid = [sign_voucher(payer, Voucher(cid, n, 30 * n), domain) for n in range(1, 31)]
    over = [sign_voucher(payer, Voucher(cid, 100 + n, 1000 + n), domain) for n in range(1, 4)]
    rng = random.Random(7)
    lists = [rng.sample(valid + over, len(valid + over)) for _ in range(8)]
    outputs = _race(tmp_path, path, lists)
    credited = sum(line.get("credited", 0) for lines in outputs for line in lines)
    errors = [line["error"] for lines in outputs for line in lines if "error" in line]
    assert credited == 900  # exactly the highest valid voucher, credited once in total
    assert errors and set(errors) == {"InvalidVoucher"}
    with open_ledger(path) as ledger:
        channel = ledger.channel(cid)
        assert channel.redeemed == 900 <= channel.deposit
        assert ledger.balance(payee.address) == 900
        assert ledger.verify().ok


@pytest.mark.slow
def test_kill_9_mid_redemption_loses_no_acknowledged_redemption(tmp_path, funded):
    path, payer, payee, cid, domain = funded
    count = 1000  # cumulative nonce * 1 credit: never above the 1000 deposit
    vfile = tmp_path / "vouchers.bin"
    vfile.write_bytes(msgpack.packb(
        [sign_voucher(payer, Voucher(cid, n, n), domain) for n in range(1, count + 1)]
    ))
    rng = random.Random(1)
    acked: dict[int, int] = {}  # nonce -> credited, as printed by a writer before it died
    kills = 0
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(vfile), cid],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and proc.stdout.readline().strip() == b"READY", proc.stderr.read()
            time.sleep(rng.uniform(0.005, 0.12))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for line in out.decode().splitlines():
            if line.startswith("ACK "):  # a torn last line is not an acknowledgement
                parts = line.split()
                if len(parts) == 3:
                    acked[int(parts[1])] = int(parts[2])
        with open_ledger(path) as ledger:
            report = ledger.verify()
            assert report.ok, report.problems
            channel = ledger.channel(cid)
            if acked:
                assert channel.nonce >= max(acked), "an acknowledged redemption was lost"
                redeemed_vouchers = {
                    json.loads(e.payload)["voucher"] for e in ledger.journal() if e.kind == "redeem"
                }
                for nonce, credited in acked.items():
                    if credited:
                        voucher = sign_voucher(payer, Voucher(cid, nonce, nonce), domain).hex()
                        assert voucher in redeemed_vouchers, f"redemption {nonce} lost"
            assert ledger.balance(payee.address) == channel.redeemed
        if channel.nonce == count:
            break
    assert kills >= 5 and acked  # the writers really were killed mid-stream
