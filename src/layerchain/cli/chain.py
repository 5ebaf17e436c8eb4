"""CLI: `layerchain chain up|down|fund|status` — a local EVM chain with the contract deployed.

``chain up --state-dir DIR`` starts anvil on 127.0.0.1 (npm's binary, installed by `make
install`; nothing is downloaded), deploys the settlement contract, funds its reward pool
and writes ``DIR/chain.json`` (``layerchain.ledger.chain``) and the endpoint's deployment
file, then returns: the chain runs in the background until ``chain down``. Every ledger
command then takes ``--ledger evm+http://127.0.0.1:PORT`` (printed by ``up``).
``chain fund ADDRESS --ether X`` sends test ether from a dev account, e.g. to a wallet that
will ``wallet deposit`` (deposits move ether into the contract: 1 credit = 1 gwei).
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from layerchain.errors import ConfigError
from layerchain.ledger.base import LedgerConfig
from layerchain.ledger.chain import (
    ACCOUNT_ETHER,
    DEFAULT_ACCOUNTS,
    REWARD_POOL,
    WEI_PER_ETHER,
    LocalChain,
)

chain_app = typer.Typer(help="A local EVM chain running the settlement contract.",
                        no_args_is_help=True)
console = Console()
_L = LedgerConfig()

STATE_DIR = typer.Option(..., "--state-dir", help="Directory holding chain.json and anvil.log.")
JSON = typer.Option(False, "--json", help="Print JSON instead of text.")


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def parse_ether(text: str) -> int:
    """``"1.5"`` ether -> wei (exact: a decimal, not a float); ConfigError if not positive."""
    try:
        wei = Decimal(text) * WEI_PER_ETHER
    except InvalidOperation:
        raise ConfigError(f"--ether takes a number of ether, not {text!r}") from None
    if wei <= 0 or wei != wei.to_integral_value():
        raise ConfigError(f"--ether must be positive with at most 18 decimals, got {text!r}")
    return int(wei)


@chain_app.command("up")
def chain_up(
    state_dir: Path = STATE_DIR,
    port: int = typer.Option(0, help="JSON-RPC port on 127.0.0.1 (0: a free port)."),
    accounts: int = typer.Option(
        DEFAULT_ACCOUNTS, help=f"Dev accounts to create, {ACCOUNT_ETHER} ether each."),
    dispute_window: float = typer.Option(
        _L.dispute_window_s, help="Seconds from a close request to refund."),
    reward_per_block_hour: int = typer.Option(
        _L.reward_per_block_hour, help="Uptime reward per block-hour served."),
    min_stake: int = typer.Option(_L.min_stake, help="Credits a node must stake to register."),
    accuser_bond: int = typer.Option(
        _L.accuser_bond, help="Credits an accuser must hold; a false accusation pays them to "
                              "the accused."),
    unstake_delay: int = typer.Option(
        3600, help="Seconds from an unstake request to the stake's return (slashable until)."),
    reward_pool: int = typer.Option(REWARD_POOL, help="Credits put into the reward pool."),
    as_json: bool = JSON,
) -> None:
    """Start anvil, deploy the contract, fund the reward pool; print the --ledger to use."""
    config = LedgerConfig(dispute_window, reward_per_block_hour, min_stake,
                          accuser_bond=accuser_bond)
    chain = LocalChain.start(state_dir, port, accounts=accounts, config=config,
                             reward_pool=reward_pool, unstake_delay_s=unstake_delay)
    info = chain.info
    if as_json:
        _print_json({**info.to_json(), "state_dir": str(chain.state_dir)})
        return
    console.print(f"chain {info.chain_id} at {info.rpc_url} (anvil pid {info.pid})", soft_wrap=True)
    console.print(f"contract {info.contract}, referee {', '.join(info.referees)}", soft_wrap=True)
    console.print(f"{len(info.accounts)} dev accounts with {ACCOUNT_ETHER} ether each: keys in "
                  f"{chain.state_dir / 'chain.json'}", soft_wrap=True)
    typer.echo(f"use: --ledger evm+{info.rpc_url}")


@chain_app.command("down")
def chain_down(state_dir: Path = STATE_DIR, as_json: bool = JSON) -> None:
    """Stop the chain started in DIR (its state is gone with it)."""
    chain = LocalChain.load(state_dir)
    stopped = chain.stop()
    if as_json:
        _print_json({"stopped": stopped, "pid": chain.info.pid, "rpc_url": chain.info.rpc_url})
    elif stopped:
        console.print(f"stopped the chain at {chain.info.rpc_url} (pid {chain.info.pid})")
    else:
        console.print(f"the chain at {chain.info.rpc_url} was not running (pid "
                      f"{chain.info.pid}); removed {state_dir / 'chain.json'}")


@chain_app.command("fund")
def chain_fund(
    address: str = typer.Argument(..., help="Address to send test ether to (0x...)."),
    state_dir: Path = STATE_DIR,
    ether: str = typer.Option(..., "--ether", help="Ether to send, e.g. 1 or 0.5."),
    as_json: bool = JSON,
) -> None:
    """Send test ether from a dev account of the chain in DIR to ADDRESS."""
    from eth_utils import is_address

    if not is_address(address):
        raise ConfigError(f"{address!r} is not an address (0x followed by 40 hex digits)")
    wei = parse_ether(ether)
    chain = _running(state_dir)
    balance = chain.fund(address, wei)
    if as_json:
        _print_json({"address": address, "funded_wei": wei, "balance_wei": balance})
    else:
        console.print(f"sent {ether} ether to {address}; it holds "
                      f"{Decimal(balance) / WEI_PER_ETHER} ether", soft_wrap=True)


@chain_app.command("status")
def chain_status(state_dir: Path = STATE_DIR, as_json: bool = JSON) -> None:
    """Whether the chain in DIR runs, where, and its contract (keys are in chain.json)."""
    chain = LocalChain.load(state_dir)
    info, alive = chain.info, chain.alive
    if as_json:
        data = {k: v for k, v in info.to_json().items() if k != "accounts"}
        _print_json({**data, "running": alive,
                     "accounts": [a.address for a in info.accounts]})
        return
    state = "running" if alive else "not running"
    console.print(f"chain {info.chain_id} at {info.rpc_url}: {state} (pid {info.pid})\n"
                  f"contract {info.contract}\nledger   {info.ledger}", soft_wrap=True)


def _running(state_dir: Path) -> LocalChain:
    chain = LocalChain.load(state_dir)
    if not chain.alive:
        raise ConfigError(f"the chain in {state_dir} is not running (pid {chain.info.pid})",
                          hint=f"`layerchain chain up --state-dir {state_dir}` starts one")
    return chain


def register(app: typer.Typer) -> None:
    """Add `chain` to the app."""
    app.add_typer(chain_app, name="chain")
