"""CLI: `layerchain wallet create|show|balance|deposit|withdraw|settle` and
`layerchain ledger init|status|journal|verify|checkpoint|redeem|slash`.

Every command takes ``--data-dir`` (default ``~/.layerchain``, env LAYERCHAIN_DATA_DIR),
holding ``wallet.json``, ``vouchers/`` and ``checkpoints.jsonl``, and ``--ledger``
(default ``DATA_DIR/ledger.sqlite``, env LAYERCHAIN_LEDGER): processes share a ledger by
pointing at the same file, or at the same chain with ``evm+http://HOST:PORT`` (the
contract from ``--contract``, env LAYERCHAIN_CONTRACT, or the deployment file ``layerchain
chain up`` wrote; ``layerchain.ledger.open``). Amounts are integers (credits). ``--json``
prints one JSON document instead of tables.

On an EVM ledger the wallet signs transactions and pays their gas in the chain's ether:
``wallet deposit N`` sends N x creditWei wei (1 credit = 1 gwei on ``chain up``'s chain)
from the wallet's address into the contract, so that address needs ether first (``layerchain
chain fund ADDRESS --state-dir DIR --ether X``); ``withdraw`` sends it back. ``ledger init``
does not apply (the rules are fixed when ``chain up`` deploys the contract), and ``ledger
slash`` needs the verdict signed by a referee of the deployment: this wallet if it is one,
``--referee-key``, or the referee keys in the ``chain.json`` of a local chain.

Every change is an operation signed by the wallet in ``--data-dir`` (a deposit mints test
credits into that wallet's account); after each one the command appends a checkpoint of
the journal head, signed by the same wallet, to ``DATA_DIR/checkpoints.jsonl``, outside
the ledger file. ``ledger verify`` checks the journal against those checkpoints and exits
1 when the journal, the balances or a checkpoint disagree.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from layerchain.errors import LayerchainError, LedgerError

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
    help="Ledger: a file (default DATA_DIR/ledger.sqlite) or a chain, evm+http://HOST:PORT.",
)
CONTRACT = typer.Option(
    None, "--contract", envvar="LAYERCHAIN_CONTRACT",
    help="The contract's address on an EVM --ledger (default: the one `chain up` deployed).",
)
JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _ledger_spec(data_dir: Path, ledger: Optional[str], contract: Optional[str] = None) -> str:
    """The ledger spec the flags name: ``--ledger`` (``--contract`` folded in) or the
    data directory's file."""
    from layerchain.ledger.open import with_contract

    return with_contract(ledger or str(data_dir.expanduser() / "ledger.sqlite"), contract)


def _open(data_dir: Path, ledger: Optional[str], *, create: bool = False, config: Any = None,
          contract: Optional[str] = None, **options: Any):
    """Open the ledger; LedgerError if a file must exist and does not."""
    from layerchain.ledger import open_ledger
    from layerchain.ledger.open import parse_ledger_spec

    spec = _ledger_spec(data_dir, ledger, contract)
    parsed = parse_ledger_spec(spec)
    if not parsed.is_evm and not create and not Path(parsed.path).exists():
        raise LedgerError(
            f"no ledger at {parsed.path}", hint="`layerchain wallet deposit AMOUNT` creates one"
        )
    return open_ledger(spec, config, **options)


def _wallet(data_dir: Path):
    from layerchain.market.wallet import Wallet

    return Wallet.load(data_dir)


def _keep_checkpoint(book: Any, wallet: Any, data_dir: Path) -> None:
    """Append the journal head, signed by ``wallet``, to DATA_DIR/checkpoints.jsonl."""
    from layerchain.ledger import CheckpointStore

    CheckpointStore.for_data_dir(data_dir).append(book.checkpoint(wallet))


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
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Balance, stake and channels of this wallet on the ledger."""
    wallet = _wallet(data_dir)
    with _open(data_dir, ledger, contract=contract) as book:
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
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Mint test credits into this wallet's ledger account (creates the ledger file if needed);
    on an EVM ledger, send AMOUNT x creditWei of the wallet's ether into the contract."""
    wallet = _wallet(data_dir)
    with _open(data_dir, ledger, create=True, contract=contract) as book:
        balance = book.deposit(wallet, amount)
        _keep_checkpoint(book, wallet, data_dir)
    if as_json:
        _print_json({"address": wallet.address, "deposited": amount, "balance": balance})
    else:
        console.print(f"deposited {amount}; balance of {wallet.address} is {balance}")


@wallet_app.command("withdraw")
def wallet_withdraw(
    amount: int = typer.Argument(..., help="Credits to take out (a positive integer)."),
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Take credits out of this wallet's ledger account."""
    wallet = _wallet(data_dir)
    with _open(data_dir, ledger, contract=contract) as book:
        balance = book.withdraw(wallet, amount)
        _keep_checkpoint(book, wallet, data_dir)
    if as_json:
        _print_json({"address": wallet.address, "withdrawn": amount, "balance": balance})
    else:
        console.print(f"withdrew {amount}; balance of {wallet.address} is {balance}")


@wallet_app.command("settle")
def wallet_settle(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Close this wallet's channels: open ones start their dispute window, closing ones
    whose window is over refund the unspent deposit."""
    from layerchain.ledger.base import CLOSING, OPEN

    wallet = _wallet(data_dir)
    rows = []
    with _open(data_dir, ledger, contract=contract) as book:
        now = book.now()  # the ledger's clock decides when a window is over
        for channel in book.channels(payer=wallet.address):
            ready = channel.state == CLOSING and (channel.closes_at or 0) <= now
            if channel.state == OPEN or ready:
                refund = book.close_channel(wallet, channel.channel_id)
                rows.append((book.channel(channel.channel_id), refund))
        if rows:
            _keep_checkpoint(book, wallet, data_dir)
        balance = book.balance(wallet.address)
    if as_json:
        _print_json({
            "address": wallet.address, "balance": balance,
            "channels": [{**asdict(c), "refund": r} for c, r in rows],
        })
        return
    for channel, refund in rows:
        note = f"refunded {refund}" if channel.state == "closed" else (
            f"closes after {channel.closes_at - now:.0f} s" if channel.closes_at else ""
        )
        console.print(f"channel {channel.channel_id[:12]}… to {channel.payee}: {channel.state} {note}")
    console.print(f"{len(rows)} channel(s) settled; balance of {wallet.address} is {balance}")


# -- ledger ---------------------------------------------------------------------------------


@ledger_app.command("init")
def ledger_init(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER, contract: Optional[str] = CONTRACT,
    dispute_window: float = typer.Option(3600.0, help="Seconds from a close request to refund."),
    reward_per_block_hour: int = typer.Option(0, help="Uptime reward per block-hour served."),
    min_stake: int = typer.Option(0, help="Credits a node must stake to register."),
    accuser_bond: int = typer.Option(
        1000, help="Credits an accuser must hold; evidence that proves no cheating pays them "
                   "to the accused."),
    as_json: bool = JSON,
) -> None:
    """Create a ledger file with these rules (they are fixed once it exists)."""
    from layerchain.ledger import LedgerConfig
    from layerchain.ledger.open import parse_ledger_spec

    spec = parse_ledger_spec(_ledger_spec(data_dir, ledger, contract))
    if spec.is_evm:
        raise LedgerError(
            "an EVM ledger's rules are fixed when its contract is deployed",
            hint="`layerchain chain up --dispute-window ...` deploys one with these flags",
        )
    path = Path(spec.path)
    if path.exists():
        raise LedgerError(f"a ledger already exists at {path}")
    config = LedgerConfig(dispute_window, reward_per_block_hour, min_stake,
                          accuser_bond=accuser_bond)
    with _open(data_dir, ledger, create=True, config=config):
        pass
    if as_json:
        _print_json({"path": str(path), "config": config.to_dict()})
    else:
        console.print(f"created ledger {path}")


@ledger_app.command("status")
def ledger_status(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Accounts, channels, rules and journal head of the ledger."""
    from layerchain.ledger.open import parse_ledger_spec

    spec = _ledger_spec(data_dir, ledger, contract)
    with _open(data_dir, ledger, contract=contract) as book:
        accounts, channels, (seq, head) = book.accounts(), book.channels(), book.head()
        config, backend = book.config, book.backend
    parsed = parse_ledger_spec(spec)
    path = parsed.path or spec  # the file, or the chain's spec
    if as_json:
        _print_json({
            "path": path, "backend": backend, "config": config.to_dict(), "journal_entries": seq,
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


def _readable(payload: str, *, brief: bool = False) -> dict[str, Any]:
    """An entry's payload with its signed operation decoded into ``operation`` (the
    signature checked; fields left at their zero value omitted)."""
    from layerchain.ledger import verify_operation
    from layerchain.ledger.operations import ZERO_ADDRESS, ZERO_ID

    data = json.loads(payload)
    if "op" in data:
        try:
            op = asdict(verify_operation(bytes.fromhex(data["op"])))
            data["operation"] = {k: v for k, v in op.items()
                                 if v not in (0, ZERO_ADDRESS, ZERO_ID) and k != "ledger_id"}
        except (LedgerError, ValueError) as error:
            data["operation"] = {"unreadable": str(error)}
        if brief:
            del data["op"]
    for long_hex in ("voucher", "receipt"):  # a redemption's voucher, a slash's receipt
        if brief and long_hex in data:
            del data[long_hex]
    return data


@ledger_app.command("journal")
def ledger_journal(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER, contract: Optional[str] = CONTRACT,
    last: int = typer.Option(20, help="Show the last N entries (0: all)."),
    kind: Optional[str] = typer.Option(None, help="Only entries of this kind, e.g. redeem."),
    as_json: bool = JSON,
) -> None:
    """The journal's entries, oldest first."""
    with _open(data_dir, ledger, contract=contract) as book:
        seq, _ = book.head()
        entries = book.journal(after=max(0, seq - last) if last > 0 and not kind else 0)
    if kind:
        entries = [e for e in entries if e.kind == kind]
        entries = entries[-last:] if last > 0 else entries
    if as_json:
        _print_json([{**asdict(e), "payload": _readable(e.payload)} for e in entries])
        return
    table = Table("seq", "kind", "payload", "hash")
    for e in entries:
        text = json.dumps(_readable(e.payload, brief=True), sort_keys=True)
        table.add_row(str(e.seq), e.kind, text if len(text) <= 100 else text[:99] + "…",
                      e.hash[:12] + "…")
    console.print(table)


CHECKPOINTS = typer.Option(
    None, "--checkpoints",
    help="A checkpoints file to check the journal against (repeatable; "
         "DATA_DIR/checkpoints.jsonl is always read when it exists).",
)


@ledger_app.command("verify")
def ledger_verify(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER, contract: Optional[str] = CONTRACT,
    checkpoints: Optional[list[Path]] = CHECKPOINTS, as_json: bool = JSON,
) -> None:
    """Check the ledger; exit 1 on any break.

    Proves, when ok: the journal is an unbroken hash chain; replaying it under the rules
    (every operation signed by its owner and used once, every voucher by its payer, ledger
    time never going backwards) gives exactly the stored balances, channels and stakes;
    and entries up to the last matching checkpoint are the ones its signer saw. It cannot
    prove that entries after the last checkpoint were not rewritten by whoever can write
    the file: keep checkpoints (every wallet command and node writes them) to anchor them.
    """
    from layerchain.ledger import CheckpointStore

    files = [CheckpointStore.for_data_dir(data_dir).path, *(checkpoints or [])]
    for path in checkpoints or []:
        if not path.expanduser().exists():
            raise LedgerError(f"no checkpoints file at {path}")
    signed = [c for path in files for c in CheckpointStore(path).load()]
    with _open(data_dir, ledger, contract=contract) as book:
        report = book.verify(signed)
    anchored = (
        f"entries 1..{report.anchored_seq} match {len(signed)} checkpoint(s) kept outside the "
        f"file, signed by {', '.join(report.anchor_signers)}"
        if report.anchored_seq else "no checkpoint anchors it"
    )
    unanchored = report.entries - report.anchored_seq
    proves = (
        f"{report.entries} journal entries: hash chain intact; replayed under the rules "
        "(operations signed by their owners and used once, vouchers by their payers, ledger "
        "time monotonic) they give the stored balances, channels and stakes; "
        f"{anchored}"
        + (f"; the last {unanchored} entries are not anchored (whoever can write the file "
           "could rewrite them)" if unanchored else "")
    )
    if as_json:
        _print_json({"ok": report.ok, "entries": report.entries, "head": report.head_hash,
                     "anchored_seq": report.anchored_seq,
                     "anchor_signers": list(report.anchor_signers),
                     "checkpoints": len(signed), "proves": proves if report.ok else "",
                     "problems": list(report.problems)})
    elif report.ok:
        typer.echo(f"ok: {proves}; head {report.head_hash}")
    else:
        for problem in report.problems:
            typer.echo(f"broken: {problem}", err=True)
        typer.echo(f"ledger verify failed: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        raise typer.Exit(1)


@ledger_app.command("checkpoint")
def ledger_checkpoint(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER, contract: Optional[str] = CONTRACT,
    out: Optional[Path] = typer.Option(
        None, "--out", help="Append to this file (default DATA_DIR/checkpoints.jsonl)."),
    as_json: bool = JSON,
) -> None:
    """Sign the journal head with this wallet and keep it outside the ledger file."""
    from layerchain.ledger import CheckpointStore, verify_checkpoint

    wallet = _wallet(data_dir)
    store = CheckpointStore(out) if out else CheckpointStore.for_data_dir(data_dir)
    with _open(data_dir, ledger, contract=contract) as book:
        data = book.checkpoint(wallet)
    store.append(data)
    checkpoint = verify_checkpoint(data).checkpoint
    if as_json:
        _print_json({"seq": checkpoint.seq, "head": checkpoint.head_hash,
                     "signer": wallet.address, "path": str(store.path)})
    else:
        console.print(f"checkpoint of entry {checkpoint.seq} ({checkpoint.head_hash[:16]}…) "
                      f"signed by {wallet.address}, kept in {store.path}")


@ledger_app.command("redeem")
def ledger_redeem(
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Redeem the node's latest vouchers, stored in DATA_DIR/vouchers/<channel_id>.bin.

    Already-redeemed vouchers credit 0; exits 1 if the ledger refused any voucher.
    """
    from layerchain.market.vouchers import VoucherStore, redeem_stored
    from layerchain.market.wallet import Wallet

    store = VoucherStore.for_data_dir(data_dir)
    vouchers = store.latest()
    wallet = Wallet.load(data_dir) if Wallet.file(data_dir).exists() else None
    # on a chain the wallet sends the one redeemMany transaction and pays its gas
    with _open(data_dir, ledger, contract=contract, sender=wallet) as book:
        results = redeem_stored(book, vouchers)
        if any(r.credited for r in results) and wallet is not None:
            _keep_checkpoint(book, wallet, data_dir)
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


@ledger_app.command("slash")
def ledger_slash(
    evidence_file: Path = typer.Option(
        ..., "--evidence", help="Evidence file of a node's cheating (written by the client's "
                                "audits: DATA_DIR/evidence/*.evidence)."),
    model: Optional[str] = typer.Option(
        None, "--model", help="The model the evidence names, to recompute the disputed step "
                              "(default: the evidence's model name)."),
    referee_key: Optional[list[str]] = typer.Option(
        None, "--referee-key", envvar="LAYERCHAIN_REFEREE_KEY",
        help="EVM ledger: the private key (hex) of a referee of the deployment, to sign the "
             "verdict (repeatable). Default: the referee keys in a local chain's chain.json, "
             "else this wallet."),
    data_dir: Path = DATA_DIR, ledger: Optional[str] = LEDGER,
    contract: Optional[str] = CONTRACT, as_json: bool = JSON,
) -> None:
    """Accuse a node with evidence: recompute the disputed step and slash its stake.

    The wallet in DATA_DIR must be the evidence's accuser and hold the ledger's bond. The
    blocks the evidence names are loaded and run over its inputs; if the node's signed
    commitment is beyond the tolerance the node's stake is slashed (part to this wallet,
    the rest burned; a receipt convicts once). If not, the accusation is refused, the
    bond goes to the accused, and the command exits 1.

    On an EVM ledger the contract cannot run the model: it takes the verdict signed by its
    referees (the deployment's verifiers, ``chain up``: dev account 0). This command
    recomputes the step here and has the verdict signed by ``--referee-key``, or the
    referees' keys in the chain.json of the local chain the deployment file names, or
    this wallet when it is a referee itself; a verdict without them is refused.
    """
    from layerchain.errors import FalseAccusation
    from layerchain.ledger.evidence import Evidence, submit_evidence
    from layerchain.ledger.open import parse_ledger_spec
    from layerchain.model import load_span, resolve_model
    from layerchain.model.dtypes import DTYPES

    evidence = Evidence.from_file(evidence_file.expanduser())
    wallet = _wallet(data_dir)
    spec = resolve_model(model or evidence.model_name or None)
    # the receipts' model id names the form the node computed in (ModelSpec.in_form): the
    # recomputation runs in that form, which the accuser cannot choose
    forms = [spec.in_form(name) for name in DTYPES if name != "auto"]
    spec = next((form for form in forms if form.model_id == evidence.model_id), spec)
    if spec.model_id != evidence.model_id:
        raise LedgerError(
            f"the evidence is for model {evidence.model_id[:12]}, {spec.name} is "
            f"{spec.weights_id[:12]} in no form (fp32, bf16, fp16, int8, int4)",
            hint="pass --model with the model the node served",
        )
    span = load_span(spec, evidence.start, evidence.end)
    book_spec = _ledger_spec(data_dir, ledger, contract)
    options: dict[str, Any] = {}
    if parse_ledger_spec(book_spec).is_evm:  # the contract takes its referees' verdict
        options["referees"] = _referee_signers(book_spec, wallet, referee_key or [])
    with _open(data_dir, ledger, contract=contract, **options) as book:
        try:
            result = submit_evidence(book, evidence, wallet, span)
        except FalseAccusation:
            _keep_checkpoint(book, wallet, data_dir)  # the bond moved: anchor it
            raise
        _keep_checkpoint(book, wallet, data_dir)
    if as_json:
        _print_json(asdict(result))
    else:
        console.print(
            f"{result.accused} convicted (journal entry {result.seq}): stake slashed by "
            f"{result.slashed}, {result.reward} to {result.accuser}, {result.burned} burned"
        )


def _referee_signers(spec: str, wallet: Any, keys: list[str]) -> list[Any]:
    """Who signs an EVM slash's verdict: ``--referee-key`` wallets, else the referees of
    the local chain the endpoint's deployment file names (their keys in its chain.json),
    else this wallet (the contract refuses it unless it is a referee)."""
    from layerchain.ledger.chain import LocalChain
    from layerchain.ledger.open import parse_ledger_spec, read_deployment
    from layerchain.market.wallet import Wallet

    signers = []
    for key in keys:
        try:
            signers.append(Wallet(bytes.fromhex(key.removeprefix("0x"))))
        except ValueError:
            raise LedgerError("--referee-key takes a private key: 64 hex digits") from None
    if signers:
        return signers
    deployment = read_deployment(parse_ledger_spec(spec).rpc_url)
    if deployment is not None and deployment.state_dir:
        try:
            chain = LocalChain.load(deployment.state_dir)
        except LayerchainError:
            chain = None
        if chain is not None and chain.info.contract == deployment.contract:
            referees = {r.lower() for r in chain.info.referees}
            signers = [chain.signer(i) for i, a in enumerate(chain.info.accounts)
                       if a.address.lower() in referees]
    return signers or [wallet]


def register(app: typer.Typer) -> None:
    """Add the `wallet` and `ledger` command groups to the app."""
    app.add_typer(wallet_app, name="wallet")
    app.add_typer(ledger_app, name="ledger")
