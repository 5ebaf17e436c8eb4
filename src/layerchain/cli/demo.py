"""CLI: `layerchain demo` — a local swarm up, one generation with a live view, swarm down.

The swarm is a priced market: the nodes charge ``--prices`` per block per token, the client
pays them through payment channels on a ledger, from a wallet funded with ``--credits``; the
demo ends with each node's earnings and the client's spend.

``--ledger sqlite`` (the default): a ledger file in the state directory. ``--ledger evm``: a
fresh local chain (``layerchain.ledger.chain.LocalChain``: anvil, the contract deployed)
in ``STATE_DIR/chain``, started and stopped by the demo; the client's and the nodes'
wallets get test ether for gas, the client deposits its credits as ether (1 credit = 1
gwei), and ``--json`` adds ``"gas"`` (``settlement_gas``): gas per channel open, per
redeemed channel and per close request, and settlement transactions per 1,000 tokens.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from layerchain.model.spec import DEFAULT_MODEL

if TYPE_CHECKING:
    from layerchain.ledger.chain import GasReport

console = Console()
err_console = Console(stderr=True)
LEDGERS = ("sqlite", "evm")  # --ledger
DISPUTE_WINDOW_S = 120  # outlasts the nodes' redemption interval (30 s)
GAS_ETHER = 10**18  # wei of test ether each wallet gets for gas on --ledger evm
STOP_GRACE_S = 30.0  # seconds a stopping node may take to drain and redeem (a transaction)


def route_text(route: tuple) -> Text:
    """``client -> peer [0:10] -> ... -> client`` as rich text."""
    text = Text("client", style="bold")
    for hop in route:
        text.append(" → ")
        text.append(f"{hop.peer_id[:10]} ", style="cyan")
        text.append(f"[{hop.start}:{hop.end}]", style="magenta")
    text.append(" → client", style="bold")
    return text


def route_json(route: tuple) -> list[dict]:
    return [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in route]


def parse_prices(text: str, count: int) -> list[int]:
    """``"1,2,3"`` -> one price per node, the list repeated as needed."""
    from layerchain.errors import ConfigError

    try:
        prices = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--prices takes integers separated by commas, not {text!r}") from None
    if not prices or any(p < 0 for p in prices):
        raise ConfigError(f"--prices needs at least one non-negative integer, got {text!r}")
    return [prices[i % len(prices)] for i in range(count)]


def payments_json(nodes: list[dict], result, ledger, client_address: str, credits: int) -> dict:
    """The demo's ``"payments"`` object: each node's work and earnings, the client's spend."""
    by_peer = {p.peer_id: p for p in result.payments}
    rows = []
    for node in nodes:
        paid = by_peer.get(node["peer_id"])
        rows.append({
            "peer_id": node["peer_id"],
            "address": node["wallet"],
            "blocks": node["end"] - node["start"],
            "tokens": paid.tokens if paid else 0,
            "price": node["price"],
            "earned": ledger.balance(node["wallet"]),
        })
    # what the nodes redeemed from the client's channels (unspent deposits are refunded
    # after the dispute window)
    spent = sum(c.redeemed for c in ledger.channels(payer=client_address))
    return {"client_spent": spent, "nodes": rows}


def settlement_gas(report: GasReport, tokens: int) -> dict:
    """The demo's ``"gas"`` object from the chain's transactions: ``open`` gas per channel
    opened, ``redeem`` gas per channel redeemed (a batch's gas shared by its channels),
    ``close`` gas per close request, ``per_1k_tokens`` settlement transactions (opens,
    redemptions, closes) per 1,000 tokens served (``tokens``: what the route processed for
    the client, prompt and generated, each through every hop); gas in gas units, rounded;
    0 where none happened. ``transactions`` counts the contract's calls by function."""
    def mean(total: int, count: int) -> int:
        return round(total / count) if count else 0

    redeem_kinds = ("redeem", "redeemMany")
    settlement = report.count("openChannel", "closeChannel", *redeem_kinds)
    return {
        "open": mean(report.total("openChannel"), report.count("openChannel")),
        "redeem": mean(report.total(*redeem_kinds), report.redeemed_channels),
        "close": mean(report.total("closeChannel"), report.count("closeChannel")),
        "per_1k_tokens": round(1000 * settlement / tokens, 3) if tokens else 0.0,
        "transactions": {k: len(v) for k, v in sorted(report.gas.items())},
    }


def payments_table(payments: dict):
    from rich.table import Table

    table = Table("node", "address", "blocks", "price", "tokens", "earned",
                  title="payments (credits)", title_justify="left")
    for row in payments["nodes"]:
        table.add_row(Text(row["peer_id"][:10]), Text(row["address"][:10] + "…"), str(row["blocks"]),
                      str(row["price"]), str(row["tokens"]), str(row["earned"]))
    table.add_section()
    total = sum(row["earned"] for row in payments["nodes"])
    table.add_row("client", "", "", "", "spent", str(payments["client_spent"]))
    table.caption = f"nodes earned {total} in all"
    return table


def demo(
    nodes: int = typer.Option(3, help="Number of nodes (ignored when --spans is given)."),
    spans: Optional[str] = typer.Option(None, help="Comma-separated spans, e.g. 0:10,10:20,20:30."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    prompt: str = typer.Option("What is the capital of France?", help="The prompt."),
    max_new_tokens: int = typer.Option(32, help="Most tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    alpha: float = typer.Option(0.0, help="Route cost weight: 0 fastest, 1 cheapest."),
    max_price: Optional[float] = typer.Option(None, help="Most a route may cost per token."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Most a route may take per token, ms."),
    state_dir: Optional[Path] = typer.Option(None, help="Keep the swarm's files here (default: a temp dir)."),
    prices: str = typer.Option("1,2,3", help="Price per block per token of each node, comma-separated."),
    credits: int = typer.Option(1_000_000, help="Credits the client's wallet starts with."),
    ledger_kind: str = typer.Option(
        "sqlite", "--ledger", metavar="sqlite|evm",
        help="sqlite: a ledger file in the state dir; evm: a fresh local chain (anvil) "
             "running the settlement contract, started and stopped by the demo."),
    device: str = typer.Option(
        "cpu", help="Where the nodes and the client's head compute: cpu, cuda (cuda:N), mps, "
        "or auto (cuda if present, else mps, else cpu)."),
    dtype: str = typer.Option(
        "fp32", metavar="auto|fp32|bf16|fp16|int8|int4",
        help="Form the nodes' and the head's weights are held in: fp32 (the exact "
        "reference), bf16, fp16, int8, int4, or auto (the fastest that keeps greedy agreement)."),
) -> None:
    """Start a local swarm, generate through it with a live view of the route, stop it."""
    from layerchain.client import Swarm
    from layerchain.cli.swarm import parse_spans
    from layerchain.errors import ConfigError
    from layerchain.ledger import LedgerConfig, open_ledger
    from layerchain.local import swarm_down, swarm_up
    from layerchain.market import Wallet
    from layerchain.model import SamplingParams, resolve_model
    from layerchain.model.device import resolve_device
    from layerchain.model.quant import resolve_dtype
    from layerchain.routing import RouteLimits

    if ledger_kind not in LEDGERS:
        raise ConfigError(f"--ledger must be one of {', '.join(LEDGERS)}, got {ledger_kind!r}")
    spec = resolve_model(model)
    resolve_device(device)  # an absent GPU fails here, before any process starts
    resolve_dtype(dtype, device)  # so does an unknown dtype (or int4 off CPU)
    span_list = parse_spans(spans, nodes, spec.num_blocks)
    state = state_dir or Path(tempfile.mkdtemp(prefix="layerchain-demo-"))

    def say(line: str) -> None:  # soft_wrap: an address stays one line, copyable
        if not as_json:
            err_console.print(Text(line, style="dim"), soft_wrap=True)

    price_list = parse_prices(prices, len(span_list))
    ledger = chain = None
    try:
        # The market: a ledger whose dispute window (120 s) outlasts the nodes' redemption
        # interval (30 s), a client wallet with its test credits, a price on every node.
        rules = LedgerConfig(dispute_window_s=DISPUTE_WINDOW_S)
        wallet = Wallet.load_or_create(state / "client")
        if ledger_kind == "evm":
            from layerchain.ledger.chain import LocalChain

            say("starting a local chain (anvil) and deploying the settlement contract")
            chain = LocalChain.start(state / "chain", config=rules, deployment_file=False)
            ledger_spec, first_block = chain.ledger_spec, chain.block_number() + 1
            say(f"chain at {chain.info.rpc_url}, contract {chain.info.contract}")
            # test ether: the client's deposit plus gas, each node's gas (redemptions)
            chain.fund(wallet.address, credits * chain.info.credit_wei + GAS_ETHER)
            for i in range(len(span_list)):
                chain.fund(Wallet.load_or_create(state / f"node-{i}").address, GAS_ETHER)
            ledger = open_ledger(ledger_spec)
        else:
            ledger_spec = str(state / "ledger.sqlite")
            ledger = open_ledger(ledger_spec, rules)
        ledger.deposit(wallet, credits)
        say(f"client wallet {wallet.address} holds {ledger.balance(wallet.address)} credits")
        say(f"starting {len(span_list)} nodes: {', '.join(map(str, span_list))}")
        node_args = [["--price", str(p), "--ledger", ledger_spec] for p in price_list]
        local = swarm_up(state, span_list, model=model, node_args=node_args, on_progress=say,
                         device=device, dtype=dtype)
        node_rows = [{**n, "price": p} for n, p in zip(local.nodes, price_list)]
        params = SamplingParams(max_new_tokens=max_new_tokens)
        with Swarm(local.initial_peers, model=model,
                   limits=RouteLimits(alpha, max_price, max_latency_ms), data_dir=state / "client",
                   ledger=ledger_spec, device=device, dtype=dtype) as client:
            stream = client.stream(prompt, params, raw=raw)
            if as_json:
                for _ in stream:
                    pass
            elif console.is_terminal:
                text = Text()
                with Live(console=console, refresh_per_second=12) as live:
                    for event in stream:
                        text.append(event.text)
                        live.update(Group(Panel(route_text(stream.route), title="route"), text))
            else:
                for event in stream:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        res = stream.result  # the client is closed: its channels are closing
        # A node redeems on a chain only when that is worth the gas (node.payments), and
        # always when it stops: the earnings are read once the nodes have stopped.
        swarm_down(state, quiet=True, grace_s=STOP_GRACE_S)
        say("swarm stopped")
        payments = payments_json(node_rows, res, ledger, wallet.address, credits)
        gas = (settlement_gas(chain.gas_report(first_block),
                              max((n["tokens"] for n in payments["nodes"]), default=0))
               if chain is not None else None)
        if as_json:
            typer.echo(json.dumps({
                "text": res.text,
                "token_ids": list(res.token_ids),
                "route": route_json(res.route),
                "tokens_per_s": res.tokens_per_s,
                "ttft_s": res.ttft_s,
                "payments": payments,
                "ledger": ledger_kind,
                **({"gas": gas} if gas is not None else {}),
            }))
        else:
            console.print(Panel(route_text(res.route), title="route"))
            console.print(
                f"[dim]{len(res.token_ids)} tokens, {res.tokens_per_s:.1f} tokens/s, "
                f"first token after {res.ttft_s:.2f} s[/dim]"
            )
            console.print(payments_table(payments))
            if gas is not None:
                console.print(
                    f"[dim]gas: {gas['open']} per channel opened, {gas['redeem']} per channel "
                    f"redeemed, {gas['close']} per close request; {gas['per_1k_tokens']} "
                    "settlement transactions per 1,000 tokens[/dim]")
    finally:
        if swarm_down(state, quiet=True, grace_s=STOP_GRACE_S):
            say("swarm stopped")
        if ledger is not None:
            ledger.close()
        if chain is not None:
            chain.stop()
            say("chain stopped")


def register(app: typer.Typer) -> None:
    """Add `demo` to the app."""
    app.command("demo")(demo)
