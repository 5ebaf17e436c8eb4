"""`layerchain chain up|down|fund|status`, the `--ledger` spec and the CLI on an EVM ledger.

The spec tests are pure. The chain tests start a real anvil (npm's, `make install`) in
process through the CLI: one module-scoped chain for the CLI-on-EVM flow, plus up/down of
its own; each takes a few seconds (anvil starts in ~1-3 s, deploying ~1 s).
"""

from __future__ import annotations

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
