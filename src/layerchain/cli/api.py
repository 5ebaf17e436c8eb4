"""CLI: `layerchain api serve` (the OpenAI-compatible gateway) and `layerchain api keys
create|list|revoke|topup` (its API keys).

Keys live in ``--keys`` (default ``DATA_DIR/gateway-keys.sqlite``, ``--data-dir`` default
``~/.layerchain``, env LAYERCHAIN_DATA_DIR); the gateway and these commands may use the
file at the same time. ``keys create`` prints the key once: only its hash is stored.
Balances are integer credits: a request holds the most it can cost while it runs (``held``
in ``keys list``), then is debited by what the swarm charged for it, never more than held.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from layerchain.cli.generate import (
    DEFAULT_AUDIT_RATE,
    AlphaOpt,
    AuditRateOpt,
    InitialPeersOpt,
    MaxLatencyOpt,
    MaxPriceOpt,
    ModelOpt,
)
from layerchain.errors import ConfigError
from layerchain.gateway.config import DEFAULT_DATA_DIR, KEYS_FILE, GatewayConfig
from layerchain.routing import RouteLimits

api_app = typer.Typer(help="The OpenAI-compatible gateway and its dashboard.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the gateway: who may call it, with what balance.",
                       no_args_is_help=True)
api_app.add_typer(keys_app, name="keys")
console = Console()

_G = GatewayConfig  # the defaults live on the dataclass

DataDirOpt = Annotated[
    Path,
    typer.Option("--data-dir", envvar="LAYERCHAIN_DATA_DIR",
                 help=f"Directory of the key store ({KEYS_FILE}) and of the paying wallet."),
]
KeysOpt = Annotated[
    Path | None,
    typer.Option("--keys", envvar="LAYERCHAIN_GATEWAY_KEYS",
                 help=f"API-key store file (default DATA_DIR/{KEYS_FILE})."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _store(data_dir: Path, keys: Path | None):
    from layerchain.gateway.keys import KeyStore

    return KeyStore(GatewayConfig(data_dir=data_dir, keys_path=keys).keys_file)


@api_app.command("serve")
def serve(
    initial_peers: InitialPeersOpt = None,
    model: ModelOpt = _G.model,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = _G.host,
    port: Annotated[int, typer.Option("--port", help="Port to listen on; 0 = a free one.")] = _G.port,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    keys: KeysOpt = None,
    require_keys: Annotated[bool, typer.Option(
        "--require-keys", help="Demand an API key even while no key exists.")] = False,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="A DNS name the gateway answers under, besides IP addresses and "
        "localhost (repeatable; '*' = any). Guards against DNS rebinding.")] = None,
    allowed_origin: Annotated[list[str] | None, typer.Option(
        "--allowed-origin", help="A web origin (scheme://host[:port]) whose pages may call the "
        "API from a browser, besides the gateway's own dashboard (repeatable).")] = None,
    alpha: AlphaOpt = _G.limits.alpha,
    max_price: MaxPriceOpt = None,
    max_latency_ms: MaxLatencyOpt = None,
    ledger: Annotated[str | None, typer.Option(
        "--ledger", envvar="LAYERCHAIN_LEDGER",
        help="Ledger to pay priced peers on, from the wallet in --data-dir: a file or "
        "evm+http://HOST:PORT.")] = None,
    contract: Annotated[str | None, typer.Option(
        "--contract", envvar="LAYERCHAIN_CONTRACT",
        help="The contract's address on an EVM --ledger (default: the one `chain up` "
        "deployed).")] = None,
    deposit: Annotated[int | None, typer.Option(
        "--deposit", help="Credits locked per payment channel (with --ledger).")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Tokens generated when a request gives no max_tokens.")] = _G.default_max_tokens,
    log_level: Annotated[str, typer.Option(
        "--log-level", help="uvicorn's log level: debug, info, warning, error.")] = "info",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Also use peers serving plaintext tcp:// (a network you trust); by "
        "default only TLS peers proving their peer id are used.")] = False,
    private_blocks: Annotated[int, typer.Option(
        "--private-blocks", metavar="N", help="Run the model's first N blocks in the gateway "
        "and route only the rest, so no peer sees prompts' embedding rows (which give away "
        "their token ids).")] = 0,
    audit_rate: AuditRateOpt = DEFAULT_AUDIT_RATE,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and the dashboard at /."""
    from layerchain.gateway.server import serve as serve_gateway
    from layerchain.ledger.open import with_contract

    if not initial_peers:
        raise ConfigError("api serve needs --initial-peers", hint="start a swarm with `layerchain swarm up`")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
    config = GatewayConfig(
        initial_peers=tuple(initial_peers), model=model, host=host, port=port,
        data_dir=data_dir, keys_path=keys, require_keys=require_keys,
        ledger=with_contract(ledger, contract) if ledger else None,
        allowed_hosts=tuple(allowed_host or ()), allowed_origins=tuple(allowed_origin or ()),
        deposit=deposit, limits=RouteLimits(alpha, max_price, max_latency_ms),
        default_max_tokens=max_tokens,
        client_options={"insecure": insecure, "private_blocks": private_blocks,
                        "audit_rate": audit_rate},
    )

    def ready(url: str, gateway) -> None:
        mode = ("API keys required" if gateway.keys_required()
                else "open (no API keys yet: `layerchain api keys create` makes one)")
        typer.echo(f"layerchain gateway for {gateway.spec.name} at {url} "
                   f"(dashboard {url}/, OpenAI base_url {url}/v1; {mode})", err=True)

    asyncio.run(serve_gateway(config, on_ready=ready, log_level=log_level))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for (a label).")] = "",
    balance: Annotated[int, typer.Option("--balance", help="Initial credits.")] = 0,
    admin: Annotated[bool, typer.Option(
        "--admin", help="An operator's key: /api/swarm shows it every caller's requests.")] = False,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    store = _store(data_dir, keys)
    key, record = store.create(name, balance, admin=admin)
    if as_json:
        typer.echo(json.dumps({"key": key, **record.to_json()}))
        return
    console.print(f"created {'admin ' if admin else ''}{record.key_id} ({name or 'no name'}) "
                  f"with {record.balance} credits", markup=False)
    console.print("the key (shown once, store it now):")
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = DEFAULT_DATA_DIR, keys: KeysOpt = None,
              as_json: JsonOpt = False) -> None:
    """List the keys: id, name, balance, spent, requests, state."""
    rows = _store(data_dir, keys).list()
    if as_json:
        typer.echo(json.dumps({"keys": [r.to_json() for r in rows]}))
        return
    table = Table(title=f"API keys ({len(rows)})")
    for col in ("key id", "name", "balance", "held", "spent", "requests", "state"):
        table.add_column(col)
    for r in rows:
        state = "[red]revoked[/red]" if r.revoked else "admin" if r.admin else "valid"
        table.add_row(r.key_id, escape(r.name), str(r.balance), str(r.held), str(r.spent),
                      str(r.requests), state)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), from `keys list`.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR, keys: KeysOpt = None, as_json: JsonOpt = False,
) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    record = _store(data_dir, keys).revoke(key_id)
    if as_json:
        typer.echo(json.dumps(record.to_json()))
    else:
        console.print(f"revoked {record.key_id}")


@keys_app.command("topup")
def keys_topup(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), from `keys list`.")],
    amount: Annotated[int, typer.Argument(help="Credits to add (> 0).")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR, keys: KeysOpt = None, as_json: JsonOpt = False,
) -> None:
    """Add credits to a key's balance."""
    record = _store(data_dir, keys).topup(key_id, amount)
    if as_json:
        typer.echo(json.dumps(record.to_json()))
    else:
        console.print(f"{record.key_id}: balance {record.balance} credits")


def register(app: typer.Typer) -> None:
    """Add `api` to the app."""
    app.add_typer(api_app, name="api")
