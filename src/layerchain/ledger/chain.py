"""A real local EVM chain for multi-process use: anvil on loopback with the contract deployed.

``LocalChain.start(state_dir)`` runs ``anvil`` (the npm package's prebuilt binary, found by
``contract.find_tool("anvil")``; nothing is downloaded) on ``127.0.0.1`` with no fork and
no network, its dev accounts (anvil's own deterministic keys, 10,000 ether each) funded
at genesis; it waits for the JSON-RPC endpoint, deploys ``LayerchainLedger`` through
``EvmLedger.deploy`` (``credit_wei`` = 10**9: 1 credit = 1 gwei; referee: account 0,
quorum 1), funds the uptime-reward pool from account 0, and writes ``DIR/chain.json``::

    {"rpc_url": "http://127.0.0.1:PORT", "contract": "0x...", "chain_id": 31337,
     "accounts": [{"address": "0x...", "private_key": "0x..."}, ...],
     "referees": ["0x..."], "credit_wei": 1000000000, "pid": int, "started": float,
     "ledger": "evm+http://127.0.0.1:PORT?contract=0x...", "config": {LedgerConfig},
     "reward_pool": int}

plus the endpoint's deployment file (``ledger.open.write_deployment``), so that
``--ledger evm+http://127.0.0.1:PORT`` finds the contract without ``--contract``. The keys
in chain.json are anvil's published test keys: a local test chain's, never a real one's.

``stop()`` (and ``layerchain chain down``) ends the anvil process (SIGTERM, then SIGKILL of
its process group), removes chain.json and the deployment file; the chain's state was in
anvil's memory and is gone. ``pid`` + ``started`` name the process (``local.launcher``'s
rule): a pid reused by another program is left alone. A state directory whose chain still
runs is refused by ``start``.

The chain's clock is its blocks' timestamps (anvil mines one block per transaction, at the
wall clock); ``advance(seconds)`` moves it forward for tests (``evm_increaseTime``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psutil

from layerchain.errors import ConfigError, LedgerError
from layerchain.ledger.base import LedgerConfig
from layerchain.ledger.open import (
    Deployment,
    deployment_path,
    read_deployment,
    write_deployment,
)

if TYPE_CHECKING:
    from layerchain.market.wallet import Wallet

CHAIN_FILE = "chain.json"
ANVIL_LOG = "anvil.log"
ANVIL_ACCOUNTS = "anvil-accounts.json"  # anvil's --config-out: its dev accounts and keys
CREDIT_WEI = 10**9  # wei per credit on a local chain: 1 credit = 1 gwei
DEFAULT_ACCOUNTS = 10  # dev accounts anvil creates and funds
ACCOUNT_ETHER = 10_000  # ether each dev account holds at genesis
REWARD_POOL = 10**9  # credits (1 ether) put into the uptime-reward pool at start
START_TIMEOUT_S = 30.0  # anvil listening and answering, seconds
RPC_TIMEOUT_S = 30.0  # one JSON-RPC request, seconds
WEI_PER_ETHER = 10**18
# anvil processes this process started, by pid: a chain outlives the `chain up` call that
# started it on purpose, and a Popen dropped while its process runs is a ResourceWarning
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class DevAccount:
    """One of anvil's funded dev accounts (a test key: never use it on a real chain)."""

    address: str  # checksummed
    private_key: str  # "0x" + 64 hex digits


@dataclass(frozen=True)
class GasReport:
    """What the contract's transactions cost (``LocalChain.gas_report``)."""

    gas: dict[str, tuple[int, ...]]  # contract function name -> gasUsed of each transaction
    redeemed_channels: int  # Redeemed events that credited something (one per channel paid)

    def count(self, *names: str) -> int:
        return sum(len(self.gas.get(n, ())) for n in names)

    def total(self, *names: str) -> int:
        return sum(sum(self.gas.get(n, ())) for n in names)


@dataclass(frozen=True)
class ChainInfo:
    """``DIR/chain.json``: where the chain listens, its contract, its keys, its process."""

    rpc_url: str
    contract: str
    chain_id: int
    accounts: tuple[DevAccount, ...]
    referees: tuple[str, ...]
    credit_wei: int
    pid: int
    started: float  # the anvil process's start time (psutil create_time), names it with pid
    config: LedgerConfig = field(default_factory=LedgerConfig)
    reward_pool: int = 0  # credits put into the reward pool at start

    @property
    def ledger(self) -> str:
        """The ``--ledger`` spec of this chain's contract."""
        return self.deployment.ledger

    @property
    def deployment(self) -> Deployment:
        return Deployment(self.rpc_url, self.contract, self.chain_id, self.credit_wei,
                          self.referees)

    def to_json(self) -> dict[str, Any]:
        return {
            "rpc_url": self.rpc_url, "contract": self.contract, "chain_id": self.chain_id,
            "accounts": [asdict(a) for a in self.accounts], "referees": list(self.referees),
            "credit_wei": self.credit_wei, "pid": self.pid, "started": self.started,
            "ledger": self.ledger, "config": self.config.to_dict(),
            "reward_pool": self.reward_pool,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChainInfo:
        try:
            return cls(
                rpc_url=str(data["rpc_url"]), contract=str(data["contract"]),
                chain_id=int(data["chain_id"]),
                accounts=tuple(DevAccount(str(a["address"]), str(a["private_key"]))
                               for a in data["accounts"]),
                referees=tuple(str(r) for r in data["referees"]),
                credit_wei=int(data["credit_wei"]), pid=int(data["pid"]),
                started=float(data["started"]),
                config=LedgerConfig.from_dict(data.get("config") or LedgerConfig().to_dict()),
                reward_pool=int(data.get("reward_pool", 0)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"not a chain.json ({error!r})") from None


def find_anvil() -> Path:
    """The anvil binary (``contract.find_tool``): LedgerError naming `make install` if absent."""
    from layerchain.ledger.contract import find_tool

    return find_tool("anvil")


def chain_file(state_dir: Path) -> Path:
    return Path(state_dir).expanduser() / CHAIN_FILE


def _is_running(pid: int, started: float) -> bool:
    from layerchain.local.launcher import LocalProcess

    return LocalProcess(pid, started).is_ours()


def _listening_port(pid: int) -> int | None:
    """The TCP port process ``pid`` or a child of it listens on (None while none does):
    npm's ``anvil`` is a node script that runs the platform's binary as its child."""
    try:
        parent = psutil.Process(pid)
        for proc in (parent, *parent.children(recursive=True)):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    return int(conn.laddr.port)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return None


class LocalChain:
    """A running local chain (``start``) or one started by another process (``load``).

    A context manager: leaving it stops the chain this object started."""

    def __init__(self, state_dir: Path, info: ChainInfo,
                 process: subprocess.Popen[bytes] | None = None) -> None:
        self.state_dir, self.info, self._process = Path(state_dir), info, process

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def start(
        cls,
        state_dir: str | Path,
        port: int = 0,
        *,
        accounts: int = DEFAULT_ACCOUNTS,
        config: LedgerConfig | None = None,
        reward_pool: int = REWARD_POOL,
        unstake_delay_s: int = 3600,
        timeout_s: float = START_TIMEOUT_S,
        deployment_file: bool = True,
    ) -> LocalChain:
        """Start anvil on ``127.0.0.1:port`` (0: a free port), deploy the contract with
        ``config``'s rules, fund the reward pool with ``reward_pool`` credits, write
        chain.json and (``deployment_file``) the endpoint's deployment file. ConfigError if
        a chain already runs there; LedgerError if anvil is missing or does not come up
        within ``timeout_s``."""
        state = Path(state_dir).expanduser()
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {port}")
        if accounts < 1:
            raise ConfigError(f"--accounts must be at least 1, got {accounts}")
        running = cls.running(state)
        if running is not None:
            raise ConfigError(
                f"a chain already runs in {state} (pid {running.info.pid}, "
                f"{running.info.rpc_url})",
                hint=f"`layerchain chain down --state-dir {state}` stops it",
            )
        state.mkdir(parents=True, exist_ok=True)
        anvil = find_anvil()
        accounts_file = state / ANVIL_ACCOUNTS
        accounts_file.unlink(missing_ok=True)
        log = (state / ANVIL_LOG).open("ab")
        try:
            process = subprocess.Popen(
                [str(anvil), "--host", "127.0.0.1", "--port", str(port), "--silent",
                 "--accounts", str(accounts), "--balance", str(ACCOUNT_ETHER),
                 "--config-out", str(accounts_file)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        try:
            started = psutil.Process(process.pid).create_time()
            bound = _wait_listening(process, state, timeout_s)
            rpc_url = f"http://127.0.0.1:{bound}"
            keys = _read_accounts(accounts_file, timeout_s)
            info = _deploy(rpc_url, keys, config or LedgerConfig(), reward_pool,
                           unstake_delay_s, pid=process.pid, started=started)
        except BaseException:
            _stop_process(process)
            raise
        _CHILDREN[process.pid] = process
        chain = cls(state, info, process)
        tmp = chain_file(state).with_suffix(".tmp")
        tmp.write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o600)  # holds (test) keys
        tmp.replace(chain_file(state))
        if deployment_file:
            write_deployment(replace(info.deployment, state_dir=str(state)))
        return chain

    @classmethod
    def load(cls, state_dir: str | Path) -> LocalChain:
        """The chain ``chain up`` started in ``state_dir`` (ConfigError if there is none)."""
        path = chain_file(Path(state_dir))
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no chain in {path.parent} (no {CHAIN_FILE})",
                              hint="`layerchain chain up --state-dir DIR` starts one") from None
        except (OSError, ValueError) as error:
            raise ConfigError(f"unreadable {path}: {error}") from None
        return cls(path.parent, ChainInfo.from_json(data))

    @classmethod
    def running(cls, state_dir: str | Path) -> LocalChain | None:
        """The chain of ``state_dir`` if its anvil process still runs, else None."""
        if not chain_file(Path(state_dir)).exists():
            return None
        try:
            chain = cls.load(state_dir)
        except ConfigError:
            return None
        return chain if chain.alive else None

    @property
    def alive(self) -> bool:
        return _is_running(self.info.pid, self.info.started)

    def stop(self) -> bool:
        """Stop anvil, remove chain.json and the deployment file (if it names this chain);
        False when the process was already gone (or its pid is another program's now)."""
        from layerchain.local.launcher import LocalProcess, stop_pids

        process = self._process or _CHILDREN.get(self.info.pid)
        if process is not None:
            stopped = process.poll() is None
            _stop_process(process)
            _CHILDREN.pop(process.pid, None)
            self._process = None
        else:
            stopped = not stop_pids([LocalProcess(self.info.pid, self.info.started)], grace_s=5.0)
        chain_file(self.state_dir).unlink(missing_ok=True)
        deployment = read_deployment(self.info.rpc_url)
        if deployment is not None and deployment.contract == self.info.contract:
            deployment_path(self.info.rpc_url).unlink(missing_ok=True)
        return stopped

    def __enter__(self) -> LocalChain:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---------------------------------------------------------------- use

    @property
    def ledger_spec(self) -> str:
        return self.info.ledger

    def signer(self, index: int) -> Wallet:
        """A ``Wallet`` holding dev account ``index``'s key (a test key)."""
        from layerchain.market.wallet import Wallet

        return Wallet(bytes.fromhex(self.info.accounts[index].private_key[2:]))

    def fund(self, address: str, wei: int) -> int:
        """Send ``wei`` from the last dev account to ``address``; its balance afterwards (wei)."""
        if wei <= 0:
            raise ConfigError(f"the amount to fund must be positive, got {wei} wei")
        w3 = _web3(self.info.rpc_url)
        to = w3.to_checksum_address(address)
        source = self.info.accounts[-1]
        if w3.eth.get_balance(w3.to_checksum_address(source.address)) <= wei:
            raise ConfigError(f"dev account {source.address} holds less than {wei} wei")
        from eth_account import Account

        tx = {
            "to": to, "value": wei, "gas": 21_000, "chainId": self.info.chain_id,
            "nonce": w3.eth.get_transaction_count(w3.to_checksum_address(source.address), "pending"),
            "maxFeePerGas": 2 * w3.eth.gas_price + 10**9, "maxPriorityFeePerGas": 10**9,
        }
        signed = Account.sign_transaction(tx, source.private_key)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RPC_TIMEOUT_S)
        return int(w3.eth.get_balance(to))

    def ether_balance(self, address: str) -> int:
        """``address``'s ether on the chain, in wei."""
        w3 = _web3(self.info.rpc_url)
        return int(w3.eth.get_balance(w3.to_checksum_address(address)))

    def gas_report(self, from_block: int = 0) -> GasReport:
        """Gas of every transaction sent to the contract from block ``from_block`` on, by
        the function it called, whoever sent it (nodes, clients: other processes)."""
        from web3 import Web3

        from layerchain.ledger.contract import load_artifact

        w3 = _web3(self.info.rpc_url)
        contract = w3.eth.contract(address=Web3.to_checksum_address(self.info.contract),
                                   abi=load_artifact()["abi"])
        names = {bytes(Web3.keccak(text=_signature(f)))[:4]: f["name"]
                 for f in load_artifact()["abi"] if f["type"] == "function"}
        gas: dict[str, list[int]] = {}
        redeemed = 0
        for number in range(from_block, int(w3.eth.block_number) + 1):
            for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
                if (tx["to"] or "").lower() != self.info.contract.lower():
                    continue
                receipt = w3.eth.get_transaction_receipt(tx["hash"])
                if receipt["status"] != 1:
                    continue
                name = names.get(bytes(tx["input"])[:4], "unknown")
                gas.setdefault(name, []).append(int(receipt["gasUsed"]))
                if name in ("redeem", "redeemMany"):
                    events = contract.events.Redeemed().process_receipt(receipt)
                    redeemed += sum(1 for e in events if e["args"]["credited"] > 0)
        return GasReport({k: tuple(v) for k, v in gas.items()}, redeemed)

    def block_number(self) -> int:
        return int(_web3(self.info.rpc_url).eth.block_number)

    def advance(self, seconds: int) -> None:
        """Move the chain's clock ``seconds`` forward and mine a block (tests: dispute windows)."""
        w3 = _web3(self.info.rpc_url)
        w3.provider.make_request("evm_increaseTime", [int(seconds)])
        w3.provider.make_request("evm_mine", [])


# ---------------------------------------------------------------- helpers


def _web3(rpc_url: str) -> Any:
    from web3 import Web3

    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": RPC_TIMEOUT_S}))


def _signature(abi_function: dict[str, Any]) -> str:
    """``name(type,...)`` of an ABI function entry, tuples expanded (its selector's text)."""
    def kind(param: dict[str, Any]) -> str:
        if param["type"].startswith("tuple"):
            inner = ",".join(kind(c) for c in param["components"])
            return f"({inner}){param['type'][len('tuple'):]}"
        return str(param["type"])

    return f"{abi_function['name']}({','.join(kind(p) for p in abi_function['inputs'])})"


def _wait_listening(process: subprocess.Popen[bytes], state: Path, timeout_s: float) -> int:
    """anvil's port once it answers JSON-RPC; LedgerError if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (state / ANVIL_LOG).read_text(errors="replace")[-500:].strip()
            raise LedgerError(f"anvil exited with code {process.returncode}: {tail or 'no output'}")
        port = _listening_port(process.pid)
        if port is not None:
            try:
                _web3(f"http://127.0.0.1:{port}").eth.chain_id  # noqa: B018 - it answers
                return port
            except Exception:  # noqa: BLE001 - not answering yet: keep polling
                pass
        time.sleep(0.05)
    raise LedgerError(f"anvil did not answer on loopback within {timeout_s:g} s",
                      hint=f"see {state / ANVIL_LOG}")


def _read_accounts(path: Path, timeout_s: float) -> tuple[DevAccount, ...]:
    """anvil's dev accounts from its ``--config-out`` file (written as it starts)."""
    from eth_utils import to_checksum_address

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            data = json.loads(path.read_text())
            return tuple(DevAccount(to_checksum_address(a), k)
                         for a, k in zip(data["available_accounts"], data["private_keys"]))
        except (FileNotFoundError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise LedgerError(f"anvil wrote no accounts to {path}") from None
            time.sleep(0.05)


def _deploy(rpc_url: str, accounts: tuple[DevAccount, ...], config: LedgerConfig,
            reward_pool: int, unstake_delay_s: int, *, pid: int, started: float) -> ChainInfo:
    """Deploy the contract from account 0 (also the referee) and fund the reward pool."""
    from layerchain.ledger.evm import EvmLedger
    from layerchain.market.wallet import Wallet

    w3 = _web3(rpc_url)
    deployer = Wallet(bytes.fromhex(accounts[0].private_key[2:]))
    contract = EvmLedger.deploy(
        w3, bytes.fromhex(accounts[0].private_key[2:]), config, credit_wei=CREDIT_WEI,
        unstake_delay_s=unstake_delay_s, referees=[deployer.address], quorum=1,
    )
    if reward_pool > 0:
        ledger = EvmLedger.connect(rpc_url, contract)
        try:
            ledger.fund_rewards(deployer, reward_pool)
        finally:
            ledger.close()
    return ChainInfo(
        rpc_url=rpc_url, contract=contract, chain_id=int(w3.eth.chain_id), accounts=accounts,
        referees=(deployer.address,), credit_wei=CREDIT_WEI, pid=pid, started=started,
        config=config, reward_pool=reward_pool,
    )


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM anvil (npm's wrapper forwards it to the binary), SIGKILL its process group
    after 5 s (the binary too, should the wrapper be gone), reap it."""
    import signal

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only anvil's processes
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=5.0)


def anvil_available() -> bool:
    """Whether ``find_anvil`` finds the binary (tests skip or fail on this)."""
    try:
        find_anvil()
    except LedgerError:
        return False
    return True
