"""The EVM ledger: the ``LayerchainLedger`` contract behind the ``Ledger`` seam.

Every method of ``base.Ledger`` maps onto the contract (``contracts/LayerchainLedger.sol``,
artifact loaded by ``ledger/contract.py``):

* reads are the contract's views (``balanceOf``, ``channel``, ``node``, ``config``);
  ``channels(payer=, payee=)`` filters ``ChannelOpened`` logs by their indexed topics;
  ``now()`` is the latest block's timestamp (the contract's clock);
* a mutation is a transaction from the owner's address, built here, signed locally with the
  owner's key (``Wallet.sign_transaction``: the key never leaves the process) and sent raw.
  Nonces: the pending transaction count, read under a per-address lock held until the
  chain accepted the transaction, so threads of one process never reuse one (another
  process racing on the same address is retried). Each transaction is simulated first
  (``eth_estimateGas``): a revert becomes the typed error of ``REVERTS`` with one line,
  before any gas is spent. ``gas_used`` tallies each mined transaction's gas by kind;
* ``redeem`` and ``redeem_many`` take no owner (a voucher pays its payee whoever submits
  it): they are sent by ``sender`` (``EvmLedger(..., sender=wallet)`` or ``set_sender``),
  a node's own wallet. A voucher the channel view shows as already redeemed credits 0
  without a transaction (the contract would credit 0 too, for gas);
* ``submit`` (an off-chain signed ``Operation``) is refused: on a chain the owner signs a
  transaction instead;
* ``slash`` needs verdicts signed by the deployment's referees (EIP-712 ``Verdict``): with
  ``referees=[Signer, ...]`` the ledger signs them itself (a referee's own deployment),
  otherwise ``slash_with_verdicts`` takes signatures the referees made (``sign_verdict``).

Journal: the contract's events, oldest first, hash-chained like a SQLite journal
(``evm_events.py``, pure). ``verify`` replays them into balances, channels, stakes and the
reward pool and compares the result with the views at the same block: a mismatch, a
negative balance or an event the rules do not allow is a problem string; checkpoints
anchor the events as they anchor a SQLite journal.

Units: amounts are credits; one credit is ``credit_wei`` wei (the contract's ``creditWei``;
``chain up`` deploys with 10**9: one credit = one gwei). Times are unix seconds of blocks.
"""

from __future__ import annotations

import ast
import re
import threading
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from layerchain.errors import (
    ChannelError,
    InsufficientFunds,
    InvalidReceipt,
    InvalidVoucher,
    LayerchainError,
    LedgerError,
)
from layerchain.ledger.base import (
    CLOSED,
    CLOSING,
    OPEN,
    AccountInfo,
    Channel,
    EvidenceVerdict,
    JournalEntry,
    LedgerConfig,
    NodeInfo,
    SlashResult,
    VerifyReport,
)
from layerchain.ledger.checkpoints import Checkpoint, check_checkpoints, sign_checkpoint
from layerchain.ledger.evm_events import Event, journal_entries, replay_events
from layerchain.ledger.records import Voucher, decode_voucher, voucher_signer
from layerchain.ledger.signatures import (
    Signer,
    address_bytes,
    eip712_digest,
    eip712_domain,
    id32_bytes,
    keccak256,
    normalize_address,
)

CREDIT_WEI = 10**9  # wei per credit of a `chain up` deployment: one credit = one gwei
UNSTAKE_DELAY_S = 7 * 24 * 3600  # default seconds between requestUnstake and completeUnstake
TIMEOUT_S = 30.0  # seconds to wait for an RPC answer or a transaction to be mined
PRIORITY_FEE_WEI = 10**9  # tip per gas (EIP-1559); max fee = 2 x base fee + tip
NONCE_RETRIES = 3  # sends of one transaction when another process took its nonce
GAS_MARGIN = 1.25  # gas limit = estimate x margin (an estimate can fall short by a few %)
STATES = {1: OPEN, 2: CLOSING, 3: CLOSED}  # the contract's channel states (0: none)
VERDICT_TYPEHASH = keccak256(
    b"Verdict(bytes32 evidenceHash,address accuser,address accused,bytes32 receiptHash,bool guilty)"
)

# custom error -> (Python error type, one line; {names} are the error's arguments)
REVERTS: dict[str, tuple[type[LayerchainError], str]] = {
    "InsufficientFunds": (InsufficientFunds, "{who} has {have} credits; {what} needs {need}"),
    "BadAmount": (LedgerError, "{what}: {reason}"),
    "BadVoucher": (InvalidVoucher, "voucher refused: {reason}"),
    "ChannelState": (ChannelError, "{what}: {reason}"),
    "NotRegistered": (LedgerError, "{who} is not a registered node with a stake"),
    "NodeState": (LedgerError, "{what}: {reason}"),
    "RewardNotDue": (LedgerError, "no reward due: {reason}"),
    "RewardPoolEmpty": (LedgerError, "the reward pool holds {pool} credits, the reward is {need}"),
    "BadEvidence": (LedgerError, "accusation refused: {reason}"),
    "BadConfig": (LedgerError, "contract config refused: {reason}"),
    "TransferFailed": (LedgerError, "{what}: the ether transfer to {who} failed"),
    "Reentrant": (LedgerError, "{what}: reentrant call refused"),
}


class TransactionSigner(Signer, Protocol):
    """A signer that also signs EVM transactions (a ``Wallet``)."""

    def sign_transaction(self, tx: Mapping[str, int | str | bytes]) -> bytes: ...


# -- revert data -> typed errors (pure) -------------------------------------------------------


def _selectors(abi: Sequence[Mapping[str, Any]]) -> dict[bytes, tuple[str, list[str], list[str]]]:
    """4-byte selector -> (error name, argument names, argument types) of the ABI's errors."""
    out = {}
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item["inputs"]]
            selector = keccak256(f"{item['name']}({','.join(types)})".encode())[:4]
            out[selector] = (item["name"], [i["name"] for i in item["inputs"]], types)
    return out


def revert_error(
    data: bytes, errors: Mapping[bytes, tuple[str, list[str], list[str]]], *, what: str, who: str
) -> LayerchainError:
    """The typed error for a revert's return data (a custom error of the contract). Pure."""
    from eth_abi import decode

    decoded = errors.get(data[:4])
    if decoded is None:
        return LedgerError(f"{what} reverted ({'0x' + data.hex() if data else 'no reason'})")
    name, names, types = decoded
    try:
        values = decode(types, data[4:])
    except Exception:  # noqa: BLE001 - malformed revert data is reported, not raised
        return LedgerError(f"{what} reverted with a malformed {name} error")
    error_type, template = REVERTS.get(name, (LedgerError, "{what}: " + name))
    return error_type(template.format(what=what, who=who, **dict(zip(names, values))))


def _raw_revert(error: BaseException) -> bytes | None:
    """The revert's return data carried by a web3 / eth-tester exception, if any."""
    for candidate in (getattr(error, "data", None), *getattr(error, "args", ())):
        if isinstance(candidate, bytes):
            return candidate
        if isinstance(candidate, str):
            text = candidate.removeprefix("execution reverted: ")
            if re.fullmatch(r"0x[0-9a-fA-F]*", text):
                return bytes.fromhex(text[2:])
            if text.startswith(("b'", 'b"')):
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, bytes):
                    return value
        if isinstance(candidate, dict) and isinstance(candidate.get("data"), str):
            return _raw_revert(ValueError(candidate["data"]))
    return None


# -- the ledger -------------------------------------------------------------------------------


_NONCE_LOCKS: dict[tuple[int, str], threading.Lock] = {}  # (chain id, sender) -> lock
_NONCE_LOCKS_GUARD = threading.Lock()


def _nonce_lock(chain_id: int, address: str) -> threading.Lock:
    with _NONCE_LOCKS_GUARD:
        return _NONCE_LOCKS.setdefault((chain_id, address), threading.Lock())


def _address(address: str) -> str:
    try:
        return normalize_address(address)
    except ValueError:
        raise LedgerError(f"{address!r} is not an address (0x + 40 hex digits)") from None


def _credits(value: Any, what: str, *, allow_zero: bool = False) -> int:
    """``value`` if it is an int in ``[1, 2^64)`` (0 too with ``allow_zero``); LedgerError
    before anything is signed."""
    low = 0 if allow_zero else 1
    if type(value) is not int or not low <= value < 2**64:
        raise LedgerError(f"{what} must be an integer in [{low}, 2^64), got {value!r}")
    return value


def _hex(value: Any) -> Any:
    """Event arguments as JSON: bytes -> "0x" hex, the rest as is."""
    return "0x" + bytes(value).hex() if isinstance(value, (bytes, bytearray)) else value


class EvmLedger:
    """A ``Ledger`` on the ``LayerchainLedger`` contract at ``contract`` (module docstring).

    Build with ``connect(rpc_url, contract)`` (a JSON-RPC node, e.g. ``chain up``'s anvil)
    or ``from_web3(w3, contract)`` (an in-process eth-tester chain). ``sender`` pays the gas
    of redemptions; ``referees`` sign slashing verdicts. Thread-safe.
    """

    backend = "evm"

    def __init__(
        self,
        w3: Any,  # web3.Web3: the untyped library object stays inside this class
        contract: str,
        *,
        sender: Signer | None = None,
        referees: Sequence[Signer] = (),
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        from layerchain.ledger.contract import load_artifact

        self.w3, self.timeout_s = w3, timeout_s
        self.address = _address(contract)
        self.sender, self.referees = sender, tuple(referees)
        artifact = load_artifact()
        self._abi: list[dict[str, Any]] = artifact["abi"]
        self._errors = _selectors(self._abi)
        self._lock = threading.RLock()  # guards the event and block-time caches, gas_used
        self._block_times: dict[int, int] = {}  # block number -> timestamp
        self._cache: list[Event] = []  # events of blocks 0.._scanned[0], oldest first
        self._scanned: tuple[int, bytes] | None = None  # (last block read, its hash)
        self._event_names = {  # topic 0 -> event name
            keccak256(f"{e['name']}({','.join(i['type'] for i in e['inputs'])})".encode()): e["name"]
            for e in self._abi if e.get("type") == "event"
        }
        self.gas_used: dict[str, list[int]] = {}
        try:
            self.chain_id = int(w3.eth.chain_id)
            code = w3.eth.get_code(self.address)
        except Exception as error:  # noqa: BLE001 - any transport failure is one line
            raise LedgerError(f"cannot reach the chain: {error}") from None
        if not code:
            raise LedgerError(
                f"no contract at {self.address} on chain {self.chain_id}",
                hint="pass the address `layerchain chain up` printed (--contract)",
            )
        self.contract = w3.eth.contract(address=self.address, abi=self._abi)
        self.domain_separator: bytes = bytes(self._view("domainSeparator"))
        if self.domain_separator != eip712_domain(chain_id=self.chain_id, contract=self.address):
            raise LedgerError(
                f"the contract at {self.address} is not a layerchain ledger (its EIP-712 domain differs)"
            )
        self.ledger_id = "0x" + self.domain_separator.hex()  # one per chain and contract
        (self.credit_wei, window, rate, min_stake, max_period, max_blocks, yield_bps, bond,
         slash_bps, reward_bps, self.unstake_delay_s, self.referee_quorum) = self._view("config")
        self.config = LedgerConfig(
            dispute_window_s=float(window), reward_per_block_hour=int(rate),
            min_stake=int(min_stake), max_reward_period_s=int(max_period),
            accuser_bond=int(bond), slash_bps=int(slash_bps), slash_reward_bps=int(reward_bps),
            max_blocks=int(max_blocks), stake_yield_bps=int(yield_bps),
        )

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        rpc_url: str,
        contract: str,
        *,
        timeout_s: float = TIMEOUT_S,
        sender: Signer | None = None,
        referees: Sequence[Signer] = (),
    ) -> EvmLedger:
        """The contract at ``contract`` on the JSON-RPC node at ``rpc_url`` (http(s)://)."""
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s}))
        return cls(w3, contract, sender=sender, referees=referees, timeout_s=timeout_s)

    @classmethod
    def from_web3(
        cls,
        w3: Any,
        contract: str,
        *,
        sender: Signer | None = None,
        referees: Sequence[Signer] = (),
    ) -> EvmLedger:
        """The contract on an existing ``Web3`` (tests: ``EthereumTesterProvider``, whose
        in-process chain is not thread-safe: its requests are serialized here)."""
        _serialize_tester(w3)
        return cls(w3, contract, sender=sender, referees=referees)

    @staticmethod
    def deploy(
        w3: Any,
        deployer_key: bytes,
        config: LedgerConfig,
        *,
        credit_wei: int = CREDIT_WEI,
        unstake_delay_s: int = UNSTAKE_DELAY_S,
        referees: Sequence[str] = (),
        quorum: int = 1,
    ) -> str:
        """Deploy the artifact with ``config`` from ``deployer_key``'s account; return the
        contract's checksummed address. ``referees`` (addresses) sign slashing verdicts,
        ``quorum`` of them per verdict; without referees the deployer is the one referee.
        A contract always caps rewards by the stake yield: LedgerError if
        ``config.stake_yield_bps`` is None."""
        from layerchain.ledger.contract import load_artifact
        from layerchain.market.wallet import Wallet

        if config.stake_yield_bps is None:
            raise LedgerError(
                "a ledger contract caps uptime rewards by the stake yield: "
                "config.stake_yield_bps must be set (0 to 10000 basis points a year)"
            )

        _serialize_tester(w3)
        deployer = Wallet(deployer_key)
        referee_list = [_address(r) for r in referees] or [deployer.address]
        artifact = load_artifact()
        factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        constructor = factory.constructor(
            credit_wei, int(config.dispute_window_s), config.reward_per_block_hour,
            config.min_stake, config.max_reward_period_s, config.max_blocks,
            config.stake_yield_bps, config.accuser_bond, config.slash_bps,
            config.slash_reward_bps, unstake_delay_s, referee_list, quorum,
        )
        data = constructor.data_in_transaction
        params = {"from": deployer.address, "data": data, "value": 0}
        errors = _selectors(artifact["abi"])
        try:
            gas = int(w3.eth.estimate_gas(params))
        except Exception as error:  # noqa: BLE001 - mapped to one typed line
            raw = _raw_revert(error)
            if raw is not None:
                raise revert_error(raw, errors, what="deployment", who=deployer.address) from None
            raise LedgerError(f"cannot deploy the ledger contract: {error}") from None
        receipt = _send(w3, deployer, params, gas, int(w3.eth.chain_id), TIMEOUT_S)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise LedgerError("the ledger contract's deployment reverted")
        return str(receipt["contractAddress"])

    def set_sender(self, sender: Signer) -> None:
        """The wallet that pays the gas of ``redeem`` / ``redeem_many`` (a node's own)."""
        self.sender = sender

    # -- reads ----------------------------------------------------------------------------

    def _view(self, name: str, *args: Any, block: int | str = "latest") -> Any:
        try:
            return getattr(self.contract.functions, name)(*args).call(block_identifier=block)
        except Exception as error:  # noqa: BLE001 - any transport failure is one line
            raise LedgerError(f"cannot read {name} from the ledger contract: {error}") from None

    def gas_price(self) -> int:
        """Wei per gas a transaction sent now pays: the latest base fee plus the tip."""
        try:
            base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas") or 0)
        except Exception as error:  # noqa: BLE001
            raise LedgerError(f"cannot reach the chain: {error}") from None
        return base_fee + PRIORITY_FEE_WEI

    def now(self) -> float:
        """The latest block's timestamp: the contract's clock."""
        try:
            return float(self.w3.eth.get_block("latest")["timestamp"])
        except Exception as error:  # noqa: BLE001
            raise LedgerError(f"cannot reach the chain: {error}") from None

    def balance(self, address: str) -> int:
        return int(self._view("balanceOf", _address(address)))

    def account(self, address: str) -> AccountInfo:
        address = _address(address)
        return AccountInfo(address, self.balance(address), int(self._view("node", address)[0]))

    def accounts(self) -> list[AccountInfo]:
        replayed = replay_events(self._events(), self.config)
        seen = set(replayed.balances) | set(replayed.nodes)
        return [self.account(a) for a in sorted(seen)]

    def channel(self, channel_id: str) -> Channel:
        cid = _channel_id(channel_id)
        payer, payee, deposit, redeemed, nonce, state, closes_at, refunded = self._view(
            "channel", bytes.fromhex(cid[2:])
        )
        if state == 0:
            raise ChannelError(f"unknown channel {cid[:10]}... on the ledger contract {self.address}")
        return Channel(
            cid, payer, payee, int(deposit), int(redeemed), int(nonce), STATES[state],
            float(closes_at) if closes_at else None, int(refunded),
        )

    def channels(self, *, payer: str | None = None, payee: str | None = None) -> list[Channel]:
        filters = {}
        if payer is not None:
            filters["payer"] = _address(payer)
        if payee is not None:
            filters["payee"] = _address(payee)
        try:
            logs = self.contract.events.ChannelOpened().get_logs(
                from_block=0, to_block="latest", argument_filters=filters
            )
        except Exception as error:  # noqa: BLE001
            raise LedgerError(f"cannot read the ledger contract's logs: {error}") from None
        return [self.channel("0x" + bytes(log["args"]["id"]).hex()) for log in logs]

    def node(self, address: str) -> NodeInfo:
        address = _address(address)
        (stake, blocks, registered_at, rewarded_until, served_at, earned, rewards, _unstaking,
         _unstake_at, _payout) = self._view("node", address)
        if registered_at == 0:
            raise LedgerError(f"{address} is not a registered node")
        return NodeInfo(address, int(stake), int(blocks), float(registered_at),
                        float(rewarded_until), float(served_at), int(earned), int(rewards))

    def unstaking(self, address: str) -> tuple[int, float]:
        """``(credits unstaking, when they can be withdrawn)`` of a node (``(0, 0.0)``: none)."""
        row = self._view("node", _address(address))
        return int(row[7]), float(row[8])

    def payout(self, address: str) -> str:
        """Where a node's redeemed credits and rewards go (itself unless ``set_payout``)."""
        payout = self._view("node", _address(address))[9]
        return _address(address) if int(payout, 16) == 0 else str(payout)

    def reward_pool(self) -> int:
        """Credits left in the uptime-reward pool."""
        return int(self._view("rewardPool"))

    def convicted(self, receipt_hash: str) -> bool:
        """Whether the receipt with this ``0x`` hash already slashed its node."""
        return bool(self._view("convicted", id32_bytes(receipt_hash)))

    # -- transactions ---------------------------------------------------------------------

    def _transact(
        self, owner: Signer | None, kind: str, call: Any, *, value: int = 0, what: str = ""
    ) -> Mapping[str, Any]:
        """Simulate, sign with ``owner``'s key, send and wait for ``call`` (a bound contract
        function); the mined receipt. A revert raises its typed error (``REVERTS``)."""
        what = what or kind.replace("_", " ")
        if owner is None or not callable(getattr(owner, "sign_transaction", None)):
            raise LedgerError(
                f"{what} on a chain is a transaction: it needs a wallet that signs transactions "
                "(a layerchain Wallet)",
                hint="redemptions are sent by the ledger's sender: EvmLedger(..., sender=wallet)",
            )
        signer: TransactionSigner = owner  # type: ignore[assignment]  # checked just above
        params = {"from": signer.address, "to": self.address, "value": value,
                  "data": call._encode_transaction_data()}
        try:
            gas = int(self.w3.eth.estimate_gas(params))
        except Exception as error:  # noqa: BLE001 - every failure becomes one typed line
            raise self._refusal(error, params, what, signer.address) from None
        receipt = _send(self.w3, signer, params, gas, self.chain_id, self.timeout_s)
        if receipt["status"] != 1:
            raise LedgerError(f"{what} reverted when mined (tx {receipt['transactionHash'].hex()})")
        with self._lock:
            self.gas_used.setdefault(kind, []).append(int(receipt["gasUsed"]))
        return receipt

    def _refusal(
        self, error: BaseException, params: Mapping[str, Any], what: str, who: str
    ) -> LayerchainError:
        raw = _raw_revert(error)
        if raw is None:  # eth-tester decodes string errors and drops the selector: ask it
            raw = _tester_revert(self.w3, params)
        if raw is not None:
            return revert_error(raw, self._errors, what=what, who=who)
        text = str(error)
        if "insufficient funds" in text.lower():
            return InsufficientFunds(f"{who} holds too little ether for {what} and its gas")
        return LedgerError(f"{what} failed: {text}")

    def _events_of(self, receipt: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
        event = getattr(self.contract.events, name)()
        return [dict(e["args"]) for e in event.process_receipt(receipt, errors=_discard())]

    def submit(self, operation: bytes) -> int:
        raise LedgerError(
            "an EVM ledger takes no signed operations: on a chain the owner signs a transaction",
            hint="call deposit/open_channel/... with the owner's wallet instead",
        )

    def deposit(self, owner: Signer, amount: int) -> int:
        """Move ``amount x credit_wei`` wei of the owner's ether into the contract."""
        amount = _credits(amount, "amount")
        wei = amount * self.credit_wei
        have = int(self.w3.eth.get_balance(owner.address))
        if have < wei:
            raise InsufficientFunds(
                f"{owner.address} holds {have} wei, depositing {amount} credits needs {wei} wei "
                "plus gas", hint="fund the account (`layerchain chain fund`)",
            )
        receipt = self._transact(owner, "deposit", self.contract.functions.deposit(), value=wei,
                                 what="depositing")
        return int(self._view("balanceOf", owner.address, block=receipt["blockNumber"]))

    def withdraw(self, owner: Signer, amount: int) -> int:
        """Take ``amount`` credits out as ether (``amount x credit_wei`` wei to the owner)."""
        call = self.contract.functions.withdraw(_credits(amount, "amount"))
        receipt = self._transact(owner, "withdraw", call, what="withdrawing")
        return int(self._view("balanceOf", owner.address, block=receipt["blockNumber"]))

    def fund_rewards(self, signer: Signer, credits: int) -> int:
        """Add ``credits`` (paid in ether by ``signer``) to the uptime-reward pool; the pool."""
        wei = _credits(credits, "credits") * self.credit_wei
        receipt = self._transact(signer, "fund_rewards", self.contract.functions.fundRewards(),
                                 value=wei, what="funding the reward pool")
        return int(self._view("rewardPool", block=receipt["blockNumber"]))

    def open_channel(self, payer: Signer, payee: str, deposit: int) -> str:
        call = self.contract.functions.openChannel(_address(payee), _credits(deposit, "deposit"))
        receipt = self._transact(payer, "open_channel", call, what="opening a channel")
        return "0x" + bytes(self._events_of(receipt, "ChannelOpened")[0]["id"]).hex()

    def top_up(self, payer: Signer, channel_id: str, amount: int) -> int:
        cid = _channel_id(channel_id)
        call = self.contract.functions.topUp(bytes.fromhex(cid[2:]), _credits(amount, "amount"))
        receipt = self._transact(payer, "top_up", call, what=f"topping up channel {cid[:10]}...")
        return int(self._view("channel", bytes.fromhex(cid[2:]), block=receipt["blockNumber"])[2])

    def redeem(self, voucher_bytes: bytes) -> int:
        """Redeem one voucher (``redeem``); a stale one credits 0 without a transaction."""
        return self._redeem([decode_voucher(voucher_bytes)], "redeem")[0]

    def redeem_many(self, vouchers: Sequence[bytes]) -> list[int]:
        """All ``vouchers`` in one ``redeemMany`` transaction; credits per voucher, in order
        (matched to the ``Redeemed`` events by channel and nonce). Stale vouchers are left
        out (they credit 0: no gas spent on them); none left, no transaction."""
        return self._redeem([decode_voucher(data) for data in vouchers], "redeem_many")

    def _redeem(self, decoded: list[tuple[Voucher, bytes]], kind: str) -> list[int]:
        fresh = [(v, sig) for v, sig in decoded if not self._stale(v, sig)]
        if not fresh:
            return [0] * len(decoded)
        if kind == "redeem":
            (v, sig), = fresh
            call = self.contract.functions.redeem(
                bytes.fromhex(v.channel_id[2:]), v.nonce, v.cumulative_amount, sig
            )
            what = f"redeeming a voucher on channel {v.channel_id[:10]}..."
        else:
            call = self.contract.functions.redeemMany(
                [(bytes.fromhex(v.channel_id[2:]), v.nonce, v.cumulative_amount, sig)
                 for v, sig in fresh]
            )
            what = f"redeeming {len(fresh)} voucher(s)"
        try:
            receipt = self._transact(self.sender, kind, call, what=what)
        except InvalidVoucher as error:
            raise _other_domain(error) from None
        credited = {("0x" + bytes(e["id"]).hex(), int(e["nonce"])): int(e["credited"])
                    for e in self._events_of(receipt, "Redeemed")}
        return [credited.pop((v.channel_id, v.nonce), 0) for v, _ in decoded]

    def _stale(self, voucher: Voucher, signature: bytes) -> bool:
        """Whether the channel already redeemed this voucher's nonce or amount (the contract
        would credit 0: no transaction is worth sending). InvalidVoucher first if it is not
        the payer's signature under this ledger's domain, as the SQLite ledger checks it
        (the contract skips a stale voucher unchecked). An unknown channel is left to the
        contract to refuse."""
        payer, _, _, redeemed, nonce, state, _, _ = self._view(
            "channel", bytes.fromhex(voucher.channel_id[2:])
        )
        if state == 0:
            return False
        if voucher_signer(voucher, signature, self.domain_separator) != address_bytes(payer):
            raise _other_domain(InvalidVoucher(
                f"voucher refused: not signed by the channel's payer {payer}"
            ))
        return bool(voucher.nonce <= nonce or voucher.cumulative_amount <= redeemed)

    def close_channel(self, payer: Signer, channel_id: str) -> int:
        cid = _channel_id(channel_id)
        call = self.contract.functions.closeChannel(bytes.fromhex(cid[2:]))
        receipt = self._transact(payer, "close_channel", call, what=f"closing channel {cid[:10]}...")
        return sum(int(e["refund"]) for e in self._events_of(receipt, "ChannelClosed"))

    def register_node(self, node: Signer, stake: int, blocks: int) -> NodeInfo:
        if type(blocks) is not int or not 0 < blocks < 2**32:
            raise LedgerError(f"blocks must be a positive integer, got {blocks!r}")
        call = self.contract.functions.registerNode(
            _credits(stake, "stake", allow_zero=True), blocks
        )
        self._transact(node, "register_node", call, what="registering the node")
        return self.node(node.address)

    def request_unstake(self, node: Signer, amount: int) -> float:
        """Move ``amount`` of the node's stake to unstaking; when it can be withdrawn (the
        chain's clock, seconds). Still slashable until then."""
        call = self.contract.functions.requestUnstake(_credits(amount, "amount"))
        self._transact(node, "request_unstake", call, what="requesting an unstake")
        return self.unstaking(node.address)[1]

    def complete_unstake(self, node: Signer) -> int:
        """After the delay: move everything unstaking to the node's balance; the credits moved."""
        receipt = self._transact(node, "complete_unstake",
                                 self.contract.functions.completeUnstake(), what="unstaking")
        return sum(int(e["amount"]) for e in self._events_of(receipt, "Unstaked"))

    def set_payout(self, node: Signer, address: str) -> None:
        """Pay the node's redeemed credits and rewards to ``address`` (its owner's wallet)."""
        self._transact(node, "set_payout", self.contract.functions.setPayout(_address(address)),
                       what="setting the payout address")

    def claim_reward(self, node: Signer) -> int:
        receipt = self._transact(node, "claim_reward", self.contract.functions.claimReward(),
                                 what="claiming the uptime reward")
        return sum(int(e["amount"]) for e in self._events_of(receipt, "RewardPaid"))

    # -- slashing -------------------------------------------------------------------------

    def slash(self, accuser: Signer, verdict: EvidenceVerdict) -> SlashResult:
        """Settle ``verdict`` with signatures of this ledger's ``referees`` (at least the
        contract's quorum of them); LedgerError when it was given too few."""
        mine = [r for r in self.referees if self._view("isReferee", r.address)]
        if len(mine) < self.referee_quorum:
            raise LedgerError(
                f"a slash on a chain needs {self.referee_quorum} referee signature(s) on the "
                f"verdict; this ledger holds {len(mine)} referee key(s)",
                hint="open it with referees=[...] or send signatures with slash_with_verdicts",
            )
        signatures = [sign_verdict(r, verdict, accuser.address, self.domain_separator)
                      for r in mine]
        return self.slash_with_verdicts(accuser, verdict, signatures)

    def slash_with_verdicts(
        self, accuser: Signer, verdict: EvidenceVerdict, referee_signatures: Sequence[bytes]
    ) -> SlashResult:
        """Settle ``verdict`` with signatures the referees made (``sign_verdict``), in any
        order (sorted by signer here, as the contract wants)."""
        receipt_bytes, signature = _receipt_parts(verdict)
        digest = verdict_digest(verdict, accuser.address, self.domain_separator)
        from layerchain.ledger.signatures import BadSignature, recover_hash_address_bytes

        try:
            ordered = sorted(referee_signatures, key=lambda s: recover_hash_address_bytes(digest, s))
        except BadSignature as error:
            raise LedgerError(f"a referee signature is malformed: {error}") from None
        call = self.contract.functions.slash(
            receipt_bytes, signature, id32_bytes(verdict.evidence_hash), verdict.guilty, ordered
        )
        receipt = self._transact(accuser, "slash", call, what="the accusation")
        event = self._events_of(receipt, "Slashed")[0]
        seq = self._seq_of(receipt)
        return SlashResult(
            verdict.evidence_hash, accuser.address, str(event["accused"]), bool(event["guilty"]),
            slashed=int(event["slashed"]), reward=int(event["reward"]),
            burned=int(event["burned"]), bond=int(event["bond"]), seq=seq,
        )

    # -- journal --------------------------------------------------------------------------

    def _genesis(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "config": self.config.to_dict(),
                "contract": self.address, "credit_wei": int(self.credit_wei),
                "ledger_id": self.ledger_id, "unstake_delay_s": int(self.unstake_delay_s)}

    def _events(self, *, to_block: int | None = None) -> list[Event]:
        """Every event of the contract up to ``to_block`` (default: the latest block), oldest
        first, decoded, with block timestamps. Read incrementally: the events of blocks
        already read are kept as long as the last block read keeps its hash (a reorg or a
        rewound chain is read again from block 0)."""
        with self._lock:
            try:
                latest = int(self.w3.eth.block_number)
                if self._scanned is not None:
                    number, known = self._scanned
                    if number > latest or self._block_hash(number) != known:
                        self._scanned, self._cache, self._block_times = None, [], {}
                start = 0 if self._scanned is None else self._scanned[0] + 1
                if start <= latest:
                    logs = self.w3.eth.get_logs(
                        {"address": self.address, "fromBlock": start, "toBlock": latest}
                    )
                    self._cache.extend(self._decode(log) for log in logs
                                       if bytes(log["topics"][0]) in self._event_names)
                    self._scanned = (latest, self._block_hash(latest))
            except LayerchainError:
                raise
            except Exception as error:  # noqa: BLE001 - any transport failure is one line
                raise LedgerError(f"cannot read the ledger contract's logs: {error}") from None
            end = latest if to_block is None else min(to_block, latest)
            return [e for e in self._cache if e.block <= end]

    def _decode(self, log: Mapping[str, Any]) -> Event:
        name = self._event_names[bytes(log["topics"][0])]
        decoded = getattr(self.contract.events, name)().process_log(log)
        return Event(name, {k: _hex(v) for k, v in decoded["args"].items()},
                     int(log["blockNumber"]), int(log["logIndex"]),
                     "0x" + bytes(log["transactionHash"]).hex(),
                     self._block_time(int(log["blockNumber"])))

    def _block_hash(self, number: int) -> bytes:
        return bytes(self.w3.eth.get_block(number)["hash"])

    def _block_time(self, number: int) -> int:
        with self._lock:
            known = self._block_times.get(number)
        if known is None:
            known = int(self.w3.eth.get_block(number)["timestamp"])
            with self._lock:
                self._block_times[number] = known
        return known

    def _seq_of(self, receipt: Mapping[str, Any]) -> int:
        """The journal seq of the last event of ``receipt``'s transaction."""
        tx = "0x" + bytes(receipt["transactionHash"]).hex()
        events = self._events(to_block=int(receipt["blockNumber"]))
        return 1 + max((i for i, e in enumerate(events, start=1) if e.tx == tx), default=0)

    def journal(self, *, after: int = 0, limit: int | None = None) -> list[JournalEntry]:
        entries = [e for e in journal_entries(self._genesis(), self._events()) if e.seq > after]
        return entries if limit is None else entries[:limit]

    def head(self) -> tuple[int, str]:
        last = journal_entries(self._genesis(), self._events())[-1]
        return last.seq, last.hash

    def checkpoint(self, signer: Signer) -> bytes:
        seq, head = self.head()
        return sign_checkpoint(signer, Checkpoint(self.ledger_id, seq, head))

    def verify(self, checkpoints: Iterable[bytes] = ()) -> VerifyReport:
        """Replay the events and compare balances, channels, nodes, what is unstaking, the
        pool and convictions with the views at the same block; check ``checkpoints``."""
        block = int(self.w3.eth.block_number)
        events = self._events(to_block=block)
        entries = journal_entries(self._genesis(), events)
        replayed = replay_events(events, self.config)
        problems = list(replayed.problems)
        for address in sorted(set(replayed.balances) | set(replayed.nodes)):
            have = int(self._view("balanceOf", address, block=block))
            if have != replayed.balances.get(address, 0):
                problems.append(f"balance of {address} is {have}, the events give "
                                f"{replayed.balances.get(address, 0)}")
        for cid, want in replayed.channels.items():
            row = self._view("channel", bytes.fromhex(cid[2:]), block=block)
            have_c = Channel(cid, row[0], row[1], int(row[2]), int(row[3]), int(row[4]),
                             STATES.get(row[5], "none"), float(row[6]) if row[6] else None,
                             int(row[7]))
            if have_c != want:
                problems.append(f"channel {cid[:10]}... is {have_c}, the events give {want}")
        for address, node in replayed.nodes.items():
            row = self._view("node", address, block=block)
            have_n = NodeInfo(address, int(row[0]), int(row[1]), float(row[2]), float(row[3]),
                              float(row[4]), int(row[5]), int(row[6]))
            if have_n != node:
                problems.append(f"node {address} is {have_n}, the events give {node}")
            if int(row[7]) != replayed.unstaking.get(address, 0):
                problems.append(f"node {address} is unstaking {int(row[7])}, the events give "
                                f"{replayed.unstaking.get(address, 0)}")
        pool = int(self._view("rewardPool", block=block))
        if pool != replayed.pool:
            problems.append(f"the reward pool holds {pool}, the events give {replayed.pool}")
        for receipt_hash in sorted(replayed.convicted):
            if not self._view("convicted", id32_bytes(receipt_hash), block=block):
                problems.append(f"receipt {receipt_hash[:10]}... convicted in the events, not on chain")
        anchoring = check_checkpoints(self.ledger_id, {e.seq: e.hash for e in entries}, checkpoints)
        problems.extend(anchoring.problems)
        return VerifyReport(len(entries), entries[-1].hash, tuple(problems),
                            anchoring.anchored_seq, anchoring.signers)

    def close(self) -> None:
        """Drop the HTTP session, if any; nothing is held on the chain."""
        session = getattr(self.w3.provider, "_request_session_manager", None)
        cache = getattr(session, "session_cache", None)
        if cache is not None and hasattr(cache, "clear"):
            cache.clear()

    def __enter__(self) -> EvmLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- verdicts ---------------------------------------------------------------------------------


def _receipt_parts(verdict: EvidenceVerdict) -> tuple[bytes, bytes]:
    """The accused receipt's 284 canonical bytes and the node's signature, from the
    verdict's SignedReceipt wire bytes; LedgerError if there is none."""
    from layerchain.market.receipts import SignedReceipt

    if not verdict.receipt:
        raise LedgerError(
            "a verdict settles on a chain only with the accused's signed receipt (the contract "
            "checks the node's signature on it); this evidence has no readable receipt"
        )
    try:
        signed = SignedReceipt.from_bytes(verdict.receipt)
    except InvalidReceipt as error:
        raise LedgerError(f"the verdict's receipt is not a signed receipt ({error})") from None
    node = signed.receipt.node_address
    if verdict.accused and address_bytes(verdict.accused) != address_bytes(node):
        raise LedgerError(f"the verdict accuses {verdict.accused}, the receipt is {node}'s")
    return signed.receipt.canonical_bytes(), signed.signature


def verdict_digest(verdict: EvidenceVerdict, accuser: str, domain: bytes) -> bytes:
    """The EIP-712 digest of ``Verdict(evidenceHash, accuser, accused, receiptHash, guilty)``
    under ``domain`` (the contract's): what referees sign raw. The accused and the receipt
    hash come from the receipt itself, as the contract takes them."""
    from layerchain.market.receipts import SignedReceipt

    receipt_bytes, _ = _receipt_parts(verdict)
    accused = SignedReceipt.from_bytes(verdict.receipt).receipt.node_address
    struct = keccak256(
        VERDICT_TYPEHASH + id32_bytes(verdict.evidence_hash) + bytes(12) + address_bytes(accuser)
        + bytes(12) + address_bytes(accused) + keccak256(receipt_bytes)
        + (1 if verdict.guilty else 0).to_bytes(32, "big")
    )
    return eip712_digest(domain, struct)


def sign_verdict(referee: Signer, verdict: EvidenceVerdict, accuser: str, domain: bytes) -> bytes:
    """A referee's 65-byte signature on ``verdict`` for ``accuser`` under ``domain``."""
    return referee.sign_hash(verdict_digest(verdict, accuser, domain))


# -- plumbing ---------------------------------------------------------------------------------


def _other_domain(error: InvalidVoucher) -> InvalidVoucher:
    """A signature the contract did not recover to the payer: another signer, or the
    payer's signature under another ledger's domain (the contract cannot tell them apart)."""
    if "not signed by" not in str(error):
        return error
    return InvalidVoucher(f"{error} for this ledger (another signer, or another ledger's domain)")


def _channel_id(value: str) -> str:
    try:
        return "0x" + id32_bytes(value).hex()
    except ValueError:
        raise ChannelError(f"channel id {value!r} is not 0x + 64 hex digits") from None


def _discard() -> Any:
    from web3.logs import DISCARD

    return DISCARD


def _send(
    w3: Any,
    signer: TransactionSigner,
    params: Mapping[str, Any],
    gas: int,
    chain_id: int,
    timeout_s: float,
) -> Mapping[str, Any]:
    """Sign ``params`` with a nonce of ``signer``'s and send it raw; wait for the receipt.

    The nonce is the address's pending transaction count, read under the address's
    process-wide lock held until the node accepted the transaction (threads never share a
    nonce); another process sending from the same address at once makes the node refuse
    the nonce, and it is read again (``NONCE_RETRIES`` times)."""
    address = signer.address
    tx_hash = None
    try:
        for attempt in range(NONCE_RETRIES):
            with _nonce_lock(chain_id, address):
                base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas") or 0)
                nonce = int(w3.eth.get_transaction_count(address, "pending"))
                tx = {**params, "nonce": nonce, "gas": int(gas * GAS_MARGIN) + 10_000,
                      "chainId": chain_id, "maxFeePerGas": 2 * base_fee + PRIORITY_FEE_WEI,
                      "maxPriorityFeePerGas": PRIORITY_FEE_WEI}
                tx.pop("from", None)
                try:
                    tx_hash = w3.eth.send_raw_transaction(signer.sign_transaction(tx))
                    break
                except Exception as error:  # noqa: BLE001 - another process took the nonce
                    if "nonce" not in str(error).lower() or attempt == NONCE_RETRIES - 1:
                        raise
        receipt: Mapping[str, Any] = w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=timeout_s, poll_latency=0.05
        )
    except LayerchainError:
        raise
    except Exception as error:  # noqa: BLE001 - transport, nonce or timeout: one line
        raise LedgerError(f"the transaction from {address} failed: {error}") from None
    return receipt


def _tester_revert(w3: Any, params: Mapping[str, Any]) -> bytes | None:
    """The raw revert data of ``params`` on an in-process eth-tester chain (web3's tester
    provider decodes string errors and loses the selector); None elsewhere."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is None:
        return None
    try:
        tester.call(dict(params), "latest")
    except Exception as error:  # noqa: BLE001 - the revert is what we are after
        return _raw_revert(error)
    return None


def _serialize_tester(w3: Any) -> None:
    """Serialize requests to an in-process eth-tester chain (py-evm is not thread-safe)."""
    provider = w3.provider
    if getattr(provider, "ethereum_tester", None) is None or getattr(provider, "_lc_locked", False):
        return
    lock = threading.RLock()
    make_request: Callable[..., Any] = provider.make_request

    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return make_request(*args, **kwargs)

    provider.make_request = locked
    provider._request_func_cache = (None, None)  # web3 caches the middleware chain around it
    provider._lc_locked = True
    provider._lc_lock = lock

