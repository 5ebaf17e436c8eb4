"""`layerchain chain up|down|fund|status`, the `--ledger` spec and the CLI on an EVM ledger.

The spec tests are pure. The chain tests (marked slow: they start a real anvil process,
npm's, from `make install`) run the CLI in process: one module-scoped chain for the
CLI-on-EVM flow, plus an up/down of its own; ~20 s for the module (anvil starts in ~1-3 s,
deploying takes ~1 s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.errors import ConfigError, LedgerError
from layerchain.ledger.open import (
    Deployment,
    deployment_path,
    open_ledger,
    parse_ledger_spec,
    read_deployment,
    resolve_contract,
    with_contract,
    write_deployment,
)

runner = CliRunner()
CONTRACT = "0x" + "ab" * 20


def _run(*args: object, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private LAYERCHAIN_HOME: deployment files never land in the real ~/.layerchain."""
    path = tmp_path / "lc-home"
    monkeypatch.setenv("LAYERCHAIN_HOME", str(path))
    return path


# -- the --ledger spec (pure) ---------------------------------------------------------------


def test_a_file_spec_is_sqlite_with_home_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = parse_ledger_spec("~/market/ledger.sqlite")
    assert (spec.backend, spec.path) == ("sqlite", str(tmp_path / "market/ledger.sqlite"))
    assert parse_ledger_spec(":memory:").path == ":memory:"
    assert parse_ledger_spec(Path("/x/y.sqlite")).path == "/x/y.sqlite"


def test_an_evm_spec_names_the_endpoint_and_maybe_the_contract():
    spec = parse_ledger_spec("evm+http://127.0.0.1:8545")
    assert (spec.backend, spec.rpc_url, spec.contract) == ("evm", "http://127.0.0.1:8545", "")
    spec = parse_ledger_spec(f"evm+https://rpc.example.org/v1?contract={CONTRACT}")
    assert (spec.rpc_url, spec.contract) == ("https://rpc.example.org/v1", CONTRACT)


@pytest.mark.parametrize("bad, words", [
    ("http://127.0.0.1:8545", "evm+http://"),  # not silently a file called "http:"
    ("evm+ftp://host:1", "evm+http://HOST:PORT"),
    ("evm+http://host:99999", "port"),
    ("evm+http://host:1?contract=0x12", "40 hex digits"),
    ("evm+http://host:1?chain=5", "unknown parameter"),
    ("", "empty"),
])
def test_a_bad_spec_is_one_clear_ledger_error(bad, words):
    with pytest.raises(LedgerError) as caught:
        parse_ledger_spec(bad)
    assert words in str(caught.value)


def test_contract_flag_folds_into_the_spec_and_refuses_contradictions():
    assert with_contract("evm+http://h:1", None) == "evm+http://h:1"
    assert with_contract("evm+http://h:1", CONTRACT) == f"evm+http://h:1?contract={CONTRACT}"
    assert parse_ledger_spec(with_contract("evm+http://h:1", CONTRACT)).contract == CONTRACT
    with pytest.raises(LedgerError, match="only applies to an EVM ledger"):
        with_contract("/tmp/ledger.sqlite", CONTRACT)
    with pytest.raises(LedgerError, match="contradicts"):
        with_contract(f"evm+http://h:1?contract={CONTRACT}", "0x" + "cd" * 20)


def test_the_contract_comes_from_the_flag_the_spec_or_the_deployment_file(home):
    spec = parse_ledger_spec("evm+http://127.0.0.1:18545")
    with pytest.raises(LedgerError) as caught:
        resolve_contract(spec)
    assert "--contract" in str(caught.value) and "chain up" in str(caught.value)
    deployed = Deployment("http://127.0.0.1:18545", "0x" + "11" * 20, 31337)
    path = write_deployment(deployed)
    assert path == home / "chains" / "127.0.0.1_18545.json" == deployment_path(deployed.rpc_url)
    assert read_deployment("http://127.0.0.1:18545") == deployed
    assert resolve_contract(spec) == deployed.contract
    assert resolve_contract(spec, CONTRACT) == CONTRACT  # the flag wins
    named = parse_ledger_spec(f"evm+http://127.0.0.1:18545?contract={CONTRACT}")
    assert resolve_contract(named) == CONTRACT  # the spec's own beats the file
    assert read_deployment("http://127.0.0.1:1") is None


def test_open_ledger_refuses_rules_for_a_chain_and_a_contract_for_a_file(home, tmp_path):
    from layerchain.ledger import LedgerConfig

    with pytest.raises(LedgerError, match="fixed when it was deployed"):
        open_ledger(f"evm+http://127.0.0.1:1?contract={CONTRACT}", LedgerConfig())
    with pytest.raises(LedgerError, match="only applies to an EVM ledger"):
        open_ledger(tmp_path / "l.sqlite", contract=CONTRACT)
    with open_ledger(str(tmp_path / "l.sqlite")) as book:  # a str path is still a file
        assert book.backend == "sqlite"


def test_node_payout_needs_an_evm_ledger_and_an_address():
    from layerchain.node.config import NodeConfig

    with pytest.raises(ConfigError, match="only applies on an EVM ledger"):
        NodeConfig(ledger="/tmp/l.sqlite", payout=CONTRACT)
    with pytest.raises(ConfigError, match="must be an address"):
        NodeConfig(ledger="evm+http://h:1", payout="alice")
    with pytest.raises(ConfigError, match="node setting ledger"):
        NodeConfig(ledger="http://h:1")
    assert NodeConfig(ledger="evm+http://h:1", payout=CONTRACT).payout == CONTRACT


def test_parse_ether_is_exact():
    from layerchain.cli.chain import parse_ether

    assert parse_ether("1") == 10**18
    assert parse_ether("0.000000001") == 10**9  # one gwei: one credit
    for bad in ("0", "-1", "x", "1e-19"):
        with pytest.raises(ConfigError):
            parse_ether(bad)


def test_chain_commands_on_a_dir_without_a_chain_say_so(tmp_path):
    out = _run("chain", "down", "--state-dir", tmp_path, code=1).output
    assert "no chain in" in out and "chain up" in out
    out = _run("chain", "fund", "0x" + "11" * 20, "--state-dir", tmp_path, "--ether", "1",
               code=1).output
    assert "no chain in" in out
    out = _run("chain", "fund", "bob", "--state-dir", tmp_path, "--ether", "1", code=1).output
    assert "is not an address" in out


# -- a real local chain (anvil) --------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One local chain for the module's CLI-on-EVM tests (60 s dispute window); its
    deployment file lands in a private LAYERCHAIN_HOME."""
    from layerchain.ledger import LedgerConfig
    from layerchain.ledger.chain import LocalChain

    saved = os.environ.get("LAYERCHAIN_HOME")
    os.environ["LAYERCHAIN_HOME"] = str(tmp_path_factory.mktemp("lc-home"))
    try:
        with LocalChain.start(tmp_path_factory.mktemp("chain"),
                              config=LedgerConfig(dispute_window_s=60)) as running:
            yield running
    finally:
        if saved is None:
            os.environ.pop("LAYERCHAIN_HOME", None)
        else:
            os.environ["LAYERCHAIN_HOME"] = saved


def _json(*args: object, code: int = 0):
    return json.loads(_run(*args, "--json", code=code).stdout)


@pytest.mark.slow  # a real anvil process
def test_chain_up_status_down_through_the_cli(home, tmp_path):
    from layerchain.local.launcher import LocalProcess

    state = tmp_path / "chain"
    up = _json("chain", "up", "--state-dir", state, "--accounts", "3", "--dispute-window", "90")
    assert set(up) >= {"rpc_url", "contract", "chain_id", "accounts", "referees", "credit_wei",
                       "pid", "ledger"}
    assert len(up["accounts"]) == 3 and up["referees"] == [up["accounts"][0]["address"]]
    assert up["credit_wei"] == 10**9 and up["ledger"].startswith("evm+http://127.0.0.1:")
    status_file = (state / "chain.json").read_text()
    assert json.loads(status_file)["contract"] == up["contract"]
    deployment = read_deployment(up["rpc_url"])
    assert deployment is not None and deployment.contract == up["contract"]
    try:
        out = _run("chain", "up", "--state-dir", state, code=1).output
        assert "already runs" in out and "chain down" in out
        status = _json("chain", "status", "--state-dir", state)
        assert status["running"] and "private_key" not in json.dumps(status)
        # the deployment file lets a bare endpoint find the contract: the rules are the flags'
        with open_ledger(f"evm+{up['rpc_url']}") as book:
            assert book.backend == "evm" and book.config.dispute_window_s == 90
    finally:
        down = _json("chain", "down", "--state-dir", state)
    assert down["stopped"]
    assert not LocalProcess(up["pid"], json.loads(status_file)["started"]).is_ours()
    assert not (state / "chain.json").exists()
    assert read_deployment(up["rpc_url"]) is None


@pytest.mark.slow  # a real anvil process
def test_wallet_commands_move_test_ether_on_a_chain(chain, tmp_path):
    client = tmp_path / "client"
    address = _json("wallet", "create", "--data-dir", client)["address"]
    spec = f"evm+{chain.info.rpc_url}"  # the contract from the deployment file
    out = _run("wallet", "deposit", "5000", "--data-dir", client, "--ledger", spec, code=1).output
    assert "holds 0 wei" in out and "chain fund" in out
    funded = _json("chain", "fund", address, "--state-dir", chain.state_dir, "--ether", "0.01")
    assert funded["balance_wei"] == 10**16
    assert _json("wallet", "deposit", "5000", "--data-dir", client, "--ledger", spec)["balance"] == 5000
    # the credits are ether in the contract: 5000 gwei left the wallet, and some gas
    spent = 10**16 - chain.ether_balance(address)
    assert 5000 * 10**9 < spent < 5000 * 10**9 + 10**15
    assert _json("wallet", "withdraw", "1200", "--data-dir", client, "--ledger", spec)["balance"] == 3800
    balance = _json("wallet", "balance", "--data-dir", client, "--ledger", spec)
    assert (balance["balance"], balance["locked_in_channels"]) == (3800, 0)
    out = _run("ledger", "init", "--ledger", spec, code=1).output
    assert "fixed when its contract is deployed" in out
    out = _run("wallet", "balance", "--data-dir", client, "--ledger", spec,
               "--contract", "0x" + "00" * 19 + "01", code=1).output
    assert "contradicts" not in out and "no contract at" in out


@pytest.mark.slow  # a real anvil process
def test_a_node_redeems_a_clients_vouchers_on_the_chain_in_one_batch(chain, tmp_path):
    from layerchain.market.vouchers import ChannelPayer, VoucherStore
    from layerchain.market.wallet import Wallet

    client, node = Wallet.create(tmp_path / "client"), Wallet.create(tmp_path / "node")
    for wallet in (client, node):
        chain.fund(wallet.address, 10**16)
    with open_ledger(chain.ledger_spec) as book:
        book.deposit(client, 3000)
        payer = ChannelPayer(client, book)
        first = payer.open(node.address, 1000).channel_id
        payer.open(node.address, 1000)  # a second channel to the same node replaces the first
        store = VoucherStore.for_data_dir(tmp_path / "node")
        store.save(payer.voucher_for(node.address, 300))
        store.save(payer.voucher_for(node.address, 200))  # cumulative: 500
        before = book.balance(node.address)
    spec = chain.ledger_spec
    redeemed = _json("ledger", "redeem", "--data-dir", tmp_path / "node", "--ledger", spec)
    assert redeemed["credited"] == 500
    again = _json("ledger", "redeem", "--data-dir", tmp_path / "node", "--ledger", spec)
    assert again["credited"] == 0  # a replayed voucher credits nothing
    with open_ledger(spec) as book:
        assert book.balance(node.address) == before + 500
        assert book.channel(first).redeemed == 0
    # the client asks to close: its channels enter the dispute window, and verify replays
    # the contract's events into the same balances
    settled = _json("wallet", "settle", "--data-dir", tmp_path / "client", "--ledger", spec)
    assert {c["state"] for c in settled["channels"]} == {"closing"}
    verify = _json("ledger", "verify", "--data-dir", tmp_path / "client", "--ledger", spec)
    assert verify["ok"], verify["problems"]
    status = _json("ledger", "status", "--ledger", spec)
    assert status["backend"] == "evm" and len(status["channels"]) >= 2
    journal = _json("ledger", "journal", "--ledger", spec, "--last", "0")
    assert journal[-1]["seq"] == status["journal_entries"] == len(journal)
    kept = _json("ledger", "checkpoint", "--data-dir", tmp_path / "node", "--ledger", spec)
    assert kept["seq"] == len(journal)
    verify = _json("ledger", "verify", "--data-dir", tmp_path / "node", "--ledger", spec)
    assert verify["ok"] and verify["anchored_seq"] == len(journal)


def test_worth_redeeming_weighs_credits_against_gas():
    from layerchain.node.payments import REDEEM_GAS_MULTIPLE, redemption_gas, worth_redeeming

    assert redemption_gas(0) == 0 and redemption_gas(2) > redemption_gas(1) > 0
    assert worth_redeeming(REDEEM_GAS_MULTIPLE * 100, 100)
    assert not worth_redeeming(REDEEM_GAS_MULTIPLE * 100 - 1, 100)
    assert worth_redeeming(1, 0) and not worth_redeeming(0, 0)  # free (SQLite): anything


@pytest.mark.slow  # a real anvil process
def test_a_node_redeems_on_a_chain_when_worth_the_gas_or_on_a_close_request(chain, tmp_path):
    """Below the threshold the vouchers wait (no transaction); above it, or once the payer
    asks to close, one redeemMany; a voucher already redeemed is never sent again."""
    import asyncio

    from layerchain.market.vouchers import ChannelPayer
    from layerchain.market.wallet import Wallet
    from layerchain.node.payments import NodePayments

    client, node = Wallet.generate(), Wallet.generate()
    for wallet in (client, node):
        chain.fund(wallet.address, 10**17)
    payee_book = open_ledger(chain.ledger_spec, sender=node)
    payer_book = open_ledger(chain.ledger_spec)
    payer_book.deposit(client, 1_000_000)
    payer = ChannelPayer(client, payer_book)
    channel = payer.open(node.address, 600_000)
    payments = NodePayments(node, model_id="m", price_per_block=1, ledger=payee_book,
                            data_dir=tmp_path / "node", blocks=10, redeem_interval_s=30)
    assert payments.book is not None
    sent = payee_book.gas_used.setdefault("redeem_many", [])

    async def rounds() -> list[int]:
        got = []
        payments.book.accept(payer.voucher_for(node.address, 1_000), 0)
        got.append(await payments.redeem(force=False))  # 1,000 credits < 3 x ~84,000 gas
        got.append(len(sent))
        payments.book.accept(payer.voucher_for(node.address, 400_000), 0)
        got.append(await payments.redeem(force=False))  # 401,000: worth it
        got.append(await payments.redeem())  # nothing owed: not even a forced round sends
        got.append(len(sent))
        payments.book.accept(payer.voucher_for(node.address, 10), 0)
        payer_book.close_channel(client, channel.channel_id)  # a close request
        got.append(await payments.redeem(force=False))
        return got

    assert asyncio.run(rounds()) == [0, 0, 401_000, 0, 1, 10]
    assert payee_book.balance(node.address) == 401_010
    assert payee_book.channel(channel.channel_id).redeemed == 401_010
    payee_book.close()
    payer_book.close()


def test_demo_gas_figures_from_a_gas_report():
    from layerchain.cli.demo import settlement_gas
    from layerchain.ledger.chain import GasReport

    report = GasReport({"openChannel": (80_000, 90_000), "redeemMany": (100_000,),
                        "redeem": (50_000,), "closeChannel": (29_000, 29_000),
                        "deposit": (45_000,)}, redeemed_channels=3)
    gas = settlement_gas(report, tokens=44)
    assert (gas["open"], gas["redeem"], gas["close"]) == (85_000, 50_000, 29_000)
    # 2 opens + 2 redemptions + 2 closes (not the deposit) over 44 tokens
    assert gas["per_1k_tokens"] == round(6_000 / 44, 3)
    assert gas["transactions"]["deposit"] == 1
    assert settlement_gas(GasReport({}, 0), tokens=0) == {
        "open": 0, "redeem": 0, "close": 0, "per_1k_tokens": 0.0, "transactions": {}}


def test_generate_and_node_carry_contract_in_the_ledger_spec():
    from layerchain.cli.generate import payment_options

    options = payment_options(Path("/d"), "evm+http://h:1", None, CONTRACT)
    assert options["ledger"] == f"evm+http://h:1?contract={CONTRACT}"
    assert payment_options(Path("/d"), None, None, CONTRACT) == {}
    out = _run("node", "start", "--blocks", "0:10", "--new-swarm", "--ledger",
               "/tmp/x.sqlite", "--payout", CONTRACT, code=1).output
    assert "only applies on an EVM ledger" in out
