"""CLI: `layerchain wallet create|show|balance|deposit|withdraw` and
`layerchain ledger init|status|journal|verify|redeem`.

Every command takes ``--data-dir`` (default ``~/.layerchain``, env LAYERCHAIN_DATA_DIR),
holding ``wallet.json`` and ``vouchers/``, and ``--ledger`` (default
``DATA_DIR/ledger.sqlite``, env LAYERCHAIN_LEDGER): processes share a ledger by pointing
at the same file. Amounts are integers. ``--json`` prints one JSON document instead of
tables. ``ledger verify`` exits 1 when the journal or the balances are broken.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from layerchain.errors import LedgerError

wallet_app = typer.Typer(help="Your wallet: a secp256k1 key and its credits.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="The ledger: balances, channels and the hash-chained journal.", no_args_is_help=True
)
console = Console()

DATA_DIR = typer.Option(
    Path("~/.layerchain"), "--data-dir", envvar="LAYERCHAIN_DATA_DIR",
    help="Directory holding wallet.json and vouchers/.",
)
LEDGER = typer.Option(
    None, "--ledger", envvar="LAYERCHAIN_LEDGER",
    help="Ledger file (default DATA_DIR/ledger.sqlite).",
)
JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _ledger_path(data_dir: Path, ledger: Optional[Path]) -> Path:
    return (ledger or data_dir / "ledger.sqlite").expanduser()


def _open(data_dir: Path, ledger: Optional[Path], *, create: bool = False, config: Any = None):
    """Open the ledger file; LedgerError if it must exist and does not."""
    from layerchain.ledger import open_ledger

    path = _ledger_path(data_dir, ledger)
    if not create and not path.exists():
        raise LedgerError(
            f"no ledger at {path}", hint="`layerchain wallet deposit AMOUNT` creates one"
        )
    return open_ledger(path, config)


def _wallet(data_dir: Path):
    from layerchain.market.wallet import Wallet

    return Wallet.load(data_dir)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


# -- wallet ---------------------------------------------------------------------------------


@wallet_app.command("create")
def wallet_create(data_dir: Path = DATA_DIR, as_json: bool = JSON) -> None:
    """Create DATA_DIR/wallet.json (mode 0600) with a new key; print its address."""
    from layerchain.market.wallet import Wallet

    wallet = Wallet.create(data_dir)
    if as_json:
        _print_json({"address": wallet.address, "path": str(wallet.path)})
    else:
        console.print(f"created wallet {wallet.address} in {wallet.path}")


@wallet_app.command("show")
def wallet_show(data_dir: Path = DATA_DIR, as_json: bool = JSON) -> None:
    """Print the wallet's address and file (never the key)."""
    wallet = _wallet(data_dir)
    if as_json:
        _print_json({"address": wallet.address, "path": str(wallet.path)})
    else:
        console.print(f"address  {wallet.address}\nfile     {wallet.path}")


@wallet_app.command("balance")
def wallet_balance(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON
) -> None:
    """Balance, stake and channels of this wallet on the ledger."""
    wallet = _wallet(data_dir)
    with _open(data_dir, ledger) as book:
        account = book.account(wallet.address)
        paying = book.channels(payer=wallet.address)
        paid = book.channels(payee=wallet.address)
    locked = sum(c.unspent for c in paying if c.state != "closed")
    if as_json:
        _print_json({
            "address": wallet.address, "balance": account.balance, "staked": account.staked,
            "locked_in_channels": locked,
            "channels_paying": [asdict(c) for c in paying],
            "channels_paid": [asdict(c) for c in paid],
        })
        return
    console.print(f"{wallet.address}: balance {account.balance}, staked {account.staked}, "
                  f"locked in channels {locked}")
    if paying or paid:
        table = Table("channel", "direction", "peer", "deposit", "redeemed", "nonce", "state")
        for c, direction, peer in [(c, "pays", c.payee) for c in paying] + [
            (c, "paid by", c.payer) for c in paid
        ]:
            table.add_row(c.channel_id[:12] + "…", direction, peer, str(c.deposit),
                          str(c.redeemed), str(c.nonce), c.state)
        console.print(table)


@wallet_app.command("deposit")
def wallet_deposit(
    amount: int = typer.Argument(..., help="Credits to add (a positive integer)."),
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON,
) -> None:
    """Add credits to this wallet's ledger account (creates the ledger file if needed)."""
    wallet = _wallet(data_dir)
    with _open(data_dir, ledger, create=True) as book:
        balance = book.deposit(wallet.address, amount)
    if as_json:
        _print_json({"address": wallet.address, "deposited": amount, "balance": balance})
    else:
        console.print(f"deposited {amount}; balance of {wallet.address} is {balance}")


@wallet_app.command("withdraw")
def wallet_withdraw(
    amount: int = typer.Argument(..., help="Credits to take out (a positive integer)."),
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON,
) -> None:
    """Take credits out of this wallet's ledger account."""
    wallet = _wallet(data_dir)
    with _open(data_dir, ledger) as book:
        balance = book.withdraw(wallet.address, amount)
    if as_json:
        _print_json({"address": wallet.address, "withdrawn": amount, "balance": balance})
    else:
        console.print(f"withdrew {amount}; balance of {wallet.address} is {balance}")


@wallet_app.command("settle")
def wallet_settle(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON
) -> None:
    """Close this wallet's channels: open ones start their dispute window, closing ones
    whose window is over refund the unspent deposit."""
    import time

    from layerchain.ledger.base import CLOSING, OPEN

    wallet = _wallet(data_dir)
    rows = []
    with _open(data_dir, ledger) as book:
        for channel in book.channels(payer=wallet.address):
            ready = channel.state == CLOSING and (channel.closes_at or 0) <= time.time()
            if channel.state == OPEN or ready:
                refund = book.close_channel(channel.channel_id)
                rows.append((book.channel(channel.channel_id), refund))
        balance = book.balance(wallet.address)
    if as_json:
        _print_json({
            "address": wallet.address, "balance": balance,
            "channels": [{**asdict(c), "refund": r} for c, r in rows],
        })
        return
    for channel, refund in rows:
        note = f"refunded {refund}" if channel.state == "closed" else (
            f"closes after {channel.closes_at - time.time():.0f} s" if channel.closes_at else ""
        )
        console.print(f"channel {channel.channel_id[:12]}… to {channel.payee}: {channel.state} {note}")
    console.print(f"{len(rows)} channel(s) settled; balance of {wallet.address} is {balance}")


# -- ledger ---------------------------------------------------------------------------------


@ledger_app.command("init")
def ledger_init(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER,
    dispute_window: float = typer.Option(3600.0, help="Seconds from a close request to refund."),
    reward_per_block_hour: int = typer.Option(0, help="Uptime reward per block-hour served."),
    min_stake: int = typer.Option(0, help="Credits a node must stake to register."),
    as_json: bool = JSON,
) -> None:
    """Create a ledger file with these rules (they are fixed once it exists)."""
    from layerchain.ledger import LedgerConfig

    path = _ledger_path(data_dir, ledger)
    if path.exists():
        raise LedgerError(f"a ledger already exists at {path}")
    config = LedgerConfig(dispute_window, reward_per_block_hour, min_stake)
    with _open(data_dir, ledger, create=True, config=config):
        pass
    if as_json:
        _print_json({"path": str(path), "config": config.to_dict()})
    else:
        console.print(f"created ledger {path}")


@ledger_app.command("status")
def ledger_status(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON
) -> None:
    """Accounts, channels, rules and journal head of the ledger."""
    with _open(data_dir, ledger) as book:
        accounts, channels, (seq, head) = book.accounts(), book.channels(), book.head()
        config, path = book.config, book.path
    if as_json:
        _print_json({
            "path": path, "config": config.to_dict(), "journal_entries": seq,
            "journal_head": head, "accounts": [asdict(a) for a in accounts],
            "channels": [asdict(c) for c in channels],
        })
        return
    console.print(f"ledger {path}: {seq} journal entries, head {head[:16]}…")
    console.print("rules: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()))
    table = Table("address", "balance", "staked", title="accounts")
    for a in accounts:
        table.add_row(a.address, str(a.balance), str(a.staked))
    console.print(table)
    if channels:
        table = Table("channel", "payer", "payee", "deposit", "redeemed", "nonce", "state",
                      title="channels")
        for c in channels:
            table.add_row(c.channel_id[:12] + "…", c.payer, c.payee, str(c.deposit),
                          str(c.redeemed), str(c.nonce), c.state)
        console.print(table)


@ledger_app.command("journal")
def ledger_journal(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER,
    last: int = typer.Option(20, help="Show the last N entries (0: all)."),
    kind: Optional[str] = typer.Option(None, help="Only entries of this kind, e.g. redeem."),
    as_json: bool = JSON,
) -> None:
    """The journal's entries, oldest first."""
    with _open(data_dir, ledger) as book:
        seq, _ = book.head()
        entries = book.journal(after=max(0, seq - last) if last > 0 and not kind else 0)
    if kind:
        entries = [e for e in entries if e.kind == kind]
        entries = entries[-last:] if last > 0 else entries
    if as_json:
        _print_json([{**asdict(e), "payload": json.loads(e.payload)} for e in entries])
        return
    table = Table("seq", "kind", "payload", "hash")
    for e in entries:
        payload = e.payload if len(e.payload) <= 100 else e.payload[:99] + "…"
        table.add_row(str(e.seq), e.kind, payload, e.hash[:12] + "…")
    console.print(table)


@ledger_app.command("verify")
def ledger_verify(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON
) -> None:
    """Re-hash and replay the whole journal, compare with balances; exit 1 on any break."""
    with _open(data_dir, ledger) as book:
        report = book.verify()
    if as_json:
        _print_json({"ok": report.ok, "entries": report.entries, "head": report.head_hash,
                     "problems": list(report.problems)})
    elif report.ok:
        console.print(f"ok: {report.entries} journal entries verified, head {report.head_hash}")
    else:
        for problem in report.problems:
            typer.echo(f"broken: {problem}", err=True)
        typer.echo(f"ledger verify failed: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        raise typer.Exit(1)


@ledger_app.command("redeem")
def ledger_redeem(
    data_dir: Path = DATA_DIR, ledger: Optional[Path] = LEDGER, as_json: bool = JSON
) -> None:
    """Redeem the node's latest vouchers, stored in DATA_DIR/vouchers/<channel_id>.bin.

    Already-redeemed vouchers credit 0; exits 1 if the ledger refused any voucher.
    """
    from layerchain.market.vouchers import VoucherStore, redeem_stored

    store = VoucherStore.for_data_dir(data_dir)
    vouchers = store.latest()
    with _open(data_dir, ledger) as book:
        results = redeem_stored(book, vouchers)
    total = sum(r.credited for r in results)
    if as_json:
        _print_json({"credited": total, "vouchers": [asdict(r) for r in results]})
    else:
        table = Table("channel", "nonce", "cumulative", "credited", "note")
        for r in results:
            table.add_row(r.channel_id[:12] + "…", str(r.nonce), str(r.cumulative_amount),
                          str(r.credited), r.error or "")
        console.print(table)
        console.print(f"credited {total} from {len(results)} voucher(s) in {store.directory}")
    if any(r.error for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `wallet` and `ledger` command groups to the app."""
    app.add_typer(wallet_app, name="wallet")
    app.add_typer(ledger_app, name="ledger")
