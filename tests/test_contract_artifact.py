"""The committed contract artifact is what the contract sources compile to, and the tools are found.

Compiling needs npm's solc (``make install`` puts it in node_modules/). Without it these
tests skip with the reason on a developer's machine and fail in CI (``$CI`` set), where a
missing compiler would otherwise hide a stale artifact. The source hashes are checked
without a compiler, so an edited contract with a stale artifact fails even in the fast tier.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from eth_tester.exceptions import TransactionFailed
from web3 import EthereumTesterProvider, Web3

from layerchain.errors import LedgerError
from layerchain.ledger import contract
from layerchain.ledger.contract import (
    ARTIFACT,
    SETTINGS,
    artifact_text,
    compile_contract,
    find_tool,
    load_artifact,
    solc,
    source_hashes,
)

REGENERATE = "run `python -m layerchain.ledger.contract` and commit the artifact"


def _need_solcjs() -> None:
    try:
        find_tool("solcjs")
    except LedgerError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the contract artifact: {error}")
        pytest.skip(f"cannot check the contract artifact here: {error}")


def test_artifact_matches_the_sources_it_records() -> None:
    artifact = load_artifact()
    assert ARTIFACT.read_text() == artifact_text(artifact), "artifact not in canonical form"
    assert artifact["source_sha256"] == source_hashes(), f"contracts/ changed: {REGENERATE}"
    assert artifact["settings"] == SETTINGS, f"compiler settings changed: {REGENERATE}"
    assert artifact["solc"] == contract.SOLC_VERSION
    names = {item.get("name") for item in artifact["abi"]}
    assert {"redeemMany", "slash", "domainSeparator", "claimReward", "completeUnstake"} <= names


@pytest.mark.slow  # solcjs (WebAssembly) compiles the contract via IR in 15-40 s
def test_recompiling_gives_the_committed_artifact() -> None:
    _need_solcjs()
    fresh = compile_contract()
    committed = load_artifact()
    for key in ("abi", "bytecode", "deployed_bytecode", "source_sha256", "settings"):
        assert fresh[key] == committed[key], f"the artifact's {key} drifted: {REGENERATE}"
    assert artifact_text(fresh) == ARTIFACT.read_text(), REGENERATE


# A payee that calls withdraw again from its receive hook, and one that refuses ether.
ATTACKER = """
// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;
interface ILedger {
    function deposit() external payable returns (uint256);
    function withdraw(uint256 amount) external returns (uint256);
}
contract Reenter {
    ILedger internal immutable ledger;
    bool public tried;
    bool public refused;
    constructor(address target) { ledger = ILedger(target); }
    function attack(uint256 amount) external payable {
        ledger.deposit{value: msg.value}();
        ledger.withdraw(amount);
    }
    receive() external payable {
        if (tried) return;
        tried = true;
        try ledger.withdraw(1) { } catch { refused = true; }
    }
}
contract Refuse {
    ILedger internal immutable ledger;
    constructor(address target) { ledger = ILedger(target); }
    function run(uint256 amount) external payable {
        ledger.deposit{value: msg.value}();
        ledger.withdraw(amount);
    }
}
"""


def _compile_attackers() -> dict[str, Any]:
    settings = {key: value for key, value in SETTINGS.items() if key != "viaIR"}  # ~3 s
    output = solc({"language": "Solidity", "sources": {"A.sol": {"content": ATTACKER}}, "settings": settings})
    return dict(output["contracts"]["A.sol"])


@pytest.mark.slow  # compiles two small contracts (~5 s with a busy CPU)
def test_withdraw_cannot_be_reentered_and_a_refused_transfer_reverts() -> None:
    _need_solcjs()
    attackers = _compile_attackers()
    w3 = Web3(EthereumTesterProvider())
    sender = w3.eth.accounts[0]
    ledger_artifact = load_artifact()

    def deploy(abi: Any, bytecode: str, *args: Any) -> Any:
        tx = w3.eth.contract(abi=abi, bytecode=bytecode).constructor(*args).transact({"from": sender})
        address = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
        return w3.eth.contract(address=address, abi=abi)

    credit_wei = 10**9
    ledger = deploy(
        ledger_artifact["abi"], ledger_artifact["bytecode"],
        credit_wei, 3600, 0, 0, 86400, 1024, 1_000, 1000, 10_000, 5_000, 600, [sender], 1,
    )
    reenter = deploy(attackers["Reenter"]["abi"], "0x" + attackers["Reenter"]["evm"]["bytecode"]["object"], ledger.address)
    tx = reenter.functions.attack(5).transact({"from": sender, "value": 10 * credit_wei})
    assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    # the nested withdraw reverted (the guard), the outer one paid exactly 5 credits
    assert reenter.functions.tried().call() and reenter.functions.refused().call()
    assert ledger.functions.balanceOf(reenter.address).call() == 5
    assert w3.eth.get_balance(reenter.address) == 5 * credit_wei
    assert w3.eth.get_balance(ledger.address) == 5 * credit_wei

    refuse = deploy(attackers["Refuse"]["abi"], "0x" + attackers["Refuse"]["evm"]["bytecode"]["object"], ledger.address)
    with pytest.raises(TransactionFailed):  # TransferFailed: the debit is undone with it
        refuse.functions.run(5).transact({"from": sender, "value": 10 * credit_wei})
    assert ledger.functions.balanceOf(refuse.address).call() == 0
    assert w3.eth.get_balance(ledger.address) == 5 * credit_wei


def test_find_tool_prefers_the_environment_then_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "modules" / ".bin" / "anvil"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LAYERCHAIN_NODE_MODULES", str(tmp_path / "modules"))
    assert find_tool("anvil") == fake


def test_find_tool_names_make_install_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERCHAIN_NODE_MODULES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(contract, "__file__", str(tmp_path / "site" / "layerchain" / "contract.py"))
    with pytest.raises(LedgerError) as raised:
        find_tool("solcjs")
    assert "make install" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(LedgerError, match="unknown EVM tool"):
        find_tool("hardhat")


def test_load_artifact_names_the_fix_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contract, "ARTIFACT", tmp_path / "missing.json")
    with pytest.raises(LedgerError, match="python -m layerchain.ledger.contract"):
        contract.load_artifact()
    (tmp_path / "missing.json").write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        contract.load_artifact()
    assert json.loads(ARTIFACT.read_text())["contract"] == "LayerchainLedger"
