"""Which ledger a ``--ledger`` spec names, and opening it: the one place a backend is chosen.

A spec is a string (every ``--ledger`` flag, ``NodeConfig.ledger``, ``Swarm(ledger=)``):

* a file path (``~`` expanded) or ``":memory:"``: the embedded SQLite ledger
  (``ledger/sqlite.py``), created on first use;
* ``evm+http://HOST:PORT`` or ``evm+https://HOST:PORT[/PATH]``: the settlement contract on
  the EVM chain whose JSON-RPC endpoint is the URL after ``evm+`` (``ledger/evm.py``). The
  contract's address comes from, in this order: ``contract=`` (the CLI's ``--contract``),
  ``?contract=0x...`` in the spec, the **deployment file** ``layerchain chain up`` wrote for
  that endpoint (``$LAYERCHAIN_HOME/chains/HOST_PORT.json``, ``LAYERCHAIN_HOME`` defaulting
  to ``~/.layerchain``); with none of them, LedgerError says to pass ``--contract`` or run
  ``layerchain chain up``.

A bare ``http://...`` is refused rather than taken for a file name. The rules of an EVM
ledger are the contract's (fixed when it was deployed: ``chain up``'s flags), so passing a
``LedgerConfig`` with an EVM spec is an error, not silently ignored.

Parsing is pure (``parse_ledger_spec``); ``open_ledger`` does the I/O. This module knows
nothing of wallets or the CLI.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from layerchain.errors import LedgerError
from layerchain.ledger.base import Ledger, LedgerConfig

if TYPE_CHECKING:
    from layerchain.ledger.evm import TransactionSigner

SQLITE, EVM = "sqlite", "evm"  # LedgerSpec.backend (and Ledger.backend)
EVM_PREFIX = "evm+"  # evm+http://... / evm+https://...
DEFAULT_HOME = "~/.layerchain"  # LAYERCHAIN_HOME when unset
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class LedgerSpec:
    """What a ``--ledger`` string names (``parse_ledger_spec``)."""

    backend: str  # SQLITE or EVM
    path: str = ""  # SQLITE: the file (``~`` expanded) or ":memory:"
    rpc_url: str = ""  # EVM: the JSON-RPC endpoint, e.g. "http://127.0.0.1:8545"
    contract: str = ""  # EVM: the contract's address when the spec names it, else ""

    @property
    def is_evm(self) -> bool:
        return self.backend == EVM


@dataclass(frozen=True)
class Deployment:
    """A deployed settlement contract: what ``chain up`` writes next to the chain
    (``DIR/chain.json`` adds the dev accounts' keys and the pid) and, without keys, in the
    deployment file of its endpoint."""

    rpc_url: str  # "http://HOST:PORT"
    contract: str  # checksummed address
    chain_id: int
    credit_wei: int = 10**9  # wei per credit (the contract's creditWei)
    referees: tuple[str, ...] = ()  # addresses whose verdicts the contract accepts
    state_dir: str = ""  # the `chain up --state-dir` holding chain.json ("" unknown)

    @property
    def ledger(self) -> str:
        """The ``--ledger`` spec of this deployment, contract included."""
        return f"{EVM_PREFIX}{self.rpc_url}?contract={self.contract}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "referees": list(self.referees), "ledger": self.ledger}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        try:
            return cls(
                rpc_url=str(data["rpc_url"]), contract=str(data["contract"]),
                chain_id=int(data["chain_id"]), credit_wei=int(data.get("credit_wei", 10**9)),
                referees=tuple(str(a) for a in data.get("referees", ())),
                state_dir=str(data.get("state_dir", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise LedgerError(f"not a deployment record ({error!r})") from None


def parse_ledger_spec(spec: str | Path) -> LedgerSpec:
    """Classify a ``--ledger`` spec; LedgerError for a URL that is not ``evm+http(s)://``."""
    if isinstance(spec, Path):
        return LedgerSpec(SQLITE, path=str(spec.expanduser()))
    text = spec.strip()
    if not text:
        raise LedgerError("empty ledger spec", hint="give a ledger file or evm+http://HOST:PORT")
    if text == ":memory:":
        return LedgerSpec(SQLITE, path=text)
    if text.startswith(EVM_PREFIX):
        return _parse_evm(text)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise LedgerError(
            f"ledger {text!r} is neither a file nor an EVM endpoint",
            hint="an EVM chain is evm+http://HOST:PORT (e.g. what `layerchain chain up` prints)",
        )
    return LedgerSpec(SQLITE, path=str(Path(text).expanduser()))


def _parse_evm(text: str) -> LedgerSpec:
    url = urlsplit(text[len(EVM_PREFIX):])
    if url.scheme not in ("http", "https") or not url.hostname:
        raise LedgerError(f"ledger {text!r}: an EVM endpoint is evm+http://HOST:PORT or "
                          "evm+https://HOST[:PORT][/PATH]")
    try:
        url.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError:
        raise LedgerError(f"ledger {text!r}: the port is not a number in 1..65535") from None
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"contract"})
    if unknown:
        raise LedgerError(f"ledger {text!r}: unknown parameter {unknown[0]!r} (only contract=)")
    contract = query.get("contract", [""])[-1]
    if contract:
        contract = check_contract_address(contract)
    rpc_url = urlunsplit((url.scheme, url.netloc, url.path, "", ""))
    return LedgerSpec(EVM, rpc_url=rpc_url, contract=contract)


def check_contract_address(address: str) -> str:
    """``address`` if it is ``0x`` + 40 hex digits; LedgerError otherwise."""
    if not _ADDRESS.fullmatch(address):
        raise LedgerError(f"contract address {address!r} is not 0x followed by 40 hex digits")
    return address


def with_contract(ledger: str, contract: str | None) -> str:
    """The spec ``ledger`` with the CLI's ``--contract`` folded in as ``?contract=``, so one
    string carries both to a node process or a client; unchanged without ``contract``.
    LedgerError when ``contract`` is given with a SQLite ledger or contradicts the spec's."""
    if not contract:
        return ledger
    parsed = parse_ledger_spec(ledger)
    if not parsed.is_evm:
        raise LedgerError("--contract only applies to an EVM ledger (--ledger evm+http://...)")
    contract = check_contract_address(contract)
    if parsed.contract and parsed.contract.lower() != contract.lower():
        raise LedgerError(f"--contract {contract} contradicts the ledger spec's {parsed.contract}")
    return f"{EVM_PREFIX}{parsed.rpc_url}?contract={contract}"


def layerchain_home() -> Path:
    """``$LAYERCHAIN_HOME`` (default ``~/.layerchain``): where deployment files live."""
    return Path(os.environ.get("LAYERCHAIN_HOME") or DEFAULT_HOME).expanduser()


def deployment_path(rpc_url: str, home: Path | None = None) -> Path:
    """``HOME/chains/HOST_PORT.json`` for an endpoint (port 80/443 when the URL has none)."""
    url = urlsplit(rpc_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    host = (url.hostname or "").replace(":", "_")  # an IPv6 literal stays one file name
    return (home or layerchain_home()) / "chains" / f"{host}_{port}.json"


def write_deployment(deployment: Deployment, home: Path | None = None) -> Path:
    """Record ``deployment`` as its endpoint's deployment file (atomically); its path."""
    path = deployment_path(deployment.rpc_url, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(deployment.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_deployment(rpc_url: str, home: Path | None = None) -> Deployment | None:
    """The deployment recorded for ``rpc_url`` (None if there is no file)."""
    path = deployment_path(rpc_url, home)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise LedgerError(f"unreadable deployment file {path}: {error}") from None
    return Deployment.from_json(data)


def resolve_contract(spec: LedgerSpec, contract: str | None = None) -> str:
    """The contract address of an EVM spec: ``contract``, else the spec's, else the
    deployment file's; LedgerError naming the ways to give one."""
    if contract:
        return check_contract_address(contract)
    if spec.contract:
        return spec.contract
    deployment = read_deployment(spec.rpc_url)
    if deployment is not None:
        return deployment.contract
    raise LedgerError(
        f"no contract address for {EVM_PREFIX}{spec.rpc_url}: no deployment file at "
        f"{deployment_path(spec.rpc_url)}",
        hint="pass --contract 0x... (or ?contract=0x... in the URL), or run `layerchain chain up`",
    )


def open_ledger(
    spec: str | Path, config: LedgerConfig | None = None, *, contract: str | None = None,
    sender: TransactionSigner | None = None, **options: Any,
) -> Ledger:
    """Open the ledger ``spec`` names (module docstring). SQLite: the file is created with
    ``config`` if it does not exist; ``options`` go to ``SqliteLedger``. EVM: ``sender``
    (a wallet that signs transactions) pays the gas of the redemptions this process sends
    (anyone may submit a voucher: whoever does pays); ``options`` go to
    ``EvmLedger.connect`` (``timeout_s``, ``referees``). SQLite has no gas: ``sender`` is
    ignored there."""
    parsed = parse_ledger_spec(spec)
    if not parsed.is_evm:
        if contract:
            raise LedgerError("--contract only applies to an EVM ledger (--ledger evm+http://...)")
        from layerchain.ledger.sqlite import SqliteLedger

        return SqliteLedger(parsed.path, config, **options)
    if config is not None:
        raise LedgerError(
            "an EVM ledger's rules are its contract's, fixed when it was deployed",
            hint="set them with `layerchain chain up` (--dispute-window, ...)",
        )
    address = resolve_contract(parsed, contract)
    from layerchain.ledger.evm import EvmLedger

    ledger: Ledger = EvmLedger.connect(parsed.rpc_url, address, sender=sender, **options)
    return ledger
