"""The settlement contract (contracts/LayerchainLedger.sol) on an in-process EVM (eth-tester + py-evm).

Every rule of the contract, and the attacks on it: forged, foreign (another deployment or
chain), malleable and replayed vouchers; early settlement and redemption after close; early
unstaking; rewards nobody attested; forged receipts and verdicts. Signatures are made with
the project's own signers (``Wallet.sign_hash`` for EIP-712 digests, ``sign_receipt`` for
receipts); the EIP-712 digests themselves come from eth_account's ``encode_typed_data``,
an implementation independent of the contract. ``measure_gas`` reports what each call
costs (``python tests/test_contract.py`` prints the table of contracts/README.md).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.messages import encode_typed_data, hash_domain
from eth_tester.exceptions import TransactionFailed
from web3 import EthereumTesterProvider, Web3
from web3.logs import DISCARD

from layerchain.ledger.contract import load_artifact
from layerchain.ledger.signatures import keccak256
from layerchain.market.receipts import ZERO_HASH, Receipt, sign_receipt
from layerchain.market.wallet import Wallet

CREDIT_WEI = 10**9  # 1 credit = 1 gwei, as `chain up` deploys
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HOUR = 3600

DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
VOUCHER_TYPE = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "nonce", "type": "uint64"},
    {"name": "cumulativeAmount", "type": "uint64"},
]
VERDICT_TYPE = [
    {"name": "evidenceHash", "type": "bytes32"},
    {"name": "accuser", "type": "address"},
    {"name": "accused", "type": "address"},
    {"name": "receiptHash", "type": "bytes32"},
    {"name": "guilty", "type": "bool"},
]


@dataclass(frozen=True)
class Rules:
    """Constructor arguments (the contract's config), in its order."""

    credit_wei: int = CREDIT_WEI
    dispute_window_s: int = HOUR
    reward_per_block_hour: int = 60  # credits per block per hour of attested uptime
    min_stake: int = 100
    max_reward_period_s: int = 24 * HOUR
    max_blocks: int = 1024
    stake_yield_bps: int = 10_000  # 100 % a year: binds only where a test means it to
    accuser_bond: int = 1000
    slash_bps: int = 5_000
    slash_reward_bps: int = 4_000
    unstake_delay_s: int = 7 * 24 * HOUR
    quorum: int = 1

    def args(self, referees: list[str]) -> tuple[Any, ...]:
        return (
            self.credit_wei, self.dispute_window_s, self.reward_per_block_hour, self.min_stake,
            self.max_reward_period_s, self.max_blocks, self.stake_yield_bps, self.accuser_bond,
            self.slash_bps, self.slash_reward_bps, self.unstake_delay_s, referees, self.quorum,
        )


@dataclass
class Evm:
    """One in-process chain and the wallets of its funded accounts (1,000,000 ether each)."""

    w3: Web3
    provider: EthereumTesterProvider
    wallets: list[Wallet]

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def travel(self, seconds: int) -> None:
        """Move the chain's clock ``seconds`` forward (the next block is stamped after it)."""
        self.provider.ethereum_tester.time_travel(self.now() + seconds)


@dataclass
class Deployed:
    """A deployed LayerchainLedger and helpers to call it as one of the wallets."""

    evm: Evm
    contract: Any  # web3 Contract
    rules: Rules
    referees: list[Wallet]
    receipts: list[Any] = field(default_factory=list)  # transaction receipts, in order

    @property
    def fn(self) -> Any:
        return self.contract.functions

    @property
    def address(self) -> str:
        return str(self.contract.address)

    def now(self) -> int:
        """The timestamp of the latest block (the last transaction's)."""
        return self.evm.now()

    def send(self, call: Any, sender: Wallet, value: int = 0) -> Any:
        """Run ``call`` as a transaction from ``sender``; return the value the call returns."""
        tx = {"from": sender.address, "value": value}
        result = call.call(tx)
        # a fixed gas limit: the call above already ran it, estimate_gas would run it again
        receipt = self.evm.w3.eth.wait_for_transaction_receipt(call.transact({**tx, "gas": 3_000_000}))
        assert receipt["status"] == 1
        self.receipts.append(receipt)
        return result

    def gas(self) -> int:
        """Gas used by the last transaction ``send`` ran."""
        return int(self.receipts[-1]["gasUsed"])

    def reverts(self, call: Any, sender: Wallet, error: str, value: int = 0) -> tuple[Any, ...]:
        """Assert ``call`` from ``sender`` reverts with the custom error ``error``; return
        its decoded arguments. The transaction is also sent, and must fail."""
        tx = {"from": sender.address, "value": value}
        with pytest.raises(TransactionFailed) as raised:
            call.call(tx)
        data = _revert_data(raised.value)
        name, args = self.decode_error(data)
        assert name == error, f"reverted with {name}{args}, expected {error}"
        with pytest.raises(TransactionFailed):
            call.transact(tx)
        return args

    def decode_error(self, data: bytes) -> tuple[str, tuple[Any, ...]]:
        for item in self.contract.abi:
            if item["type"] != "error":
                continue
            types = [i["type"] for i in item["inputs"]]
            selector = keccak256(f"{item['name']}({','.join(types)})".encode())[:4]
            if data[:4] == selector:
                return item["name"], tuple(abi_decode(types, data[4:]))
        raise AssertionError(f"unknown revert data {data.hex()}")

    # -- typed data ------------------------------------------------------------------

    def domain(self, *, chain_id: int | None = None, contract: str | None = None) -> dict[str, Any]:
        return {
            "name": "layerchain",
            "version": "1",
            "chainId": self.evm.w3.eth.chain_id if chain_id is None else chain_id,
            "verifyingContract": contract or self.address,
        }

    def voucher(self, payer: Wallet, channel_id: bytes, nonce: int, amount: int, **domain: Any) -> bytes:
        """The payer's EIP-712 signature of Voucher(channelId, nonce, cumulativeAmount)."""
        message = {"channelId": channel_id, "nonce": nonce, "cumulativeAmount": amount}
        return payer.sign_hash(_typed_digest(self.domain(**domain), "Voucher", VOUCHER_TYPE, message))

    def verdict_sigs(
        self,
        signers: list[Wallet],
        *,
        evidence: bytes,
        accuser: Wallet,
        accused: str,
        receipt: bytes,
        guilty: bool,
        **domain: Any,
    ) -> list[bytes]:
        """EIP-712 Verdict signatures by ``signers``, sorted by signer address as the contract wants."""
        message = {
            "evidenceHash": evidence,
            "accuser": accuser.address,
            "accused": accused,
            "receiptHash": keccak256(receipt),
            "guilty": guilty,
        }
        digest = _typed_digest(self.domain(**domain), "Verdict", VERDICT_TYPE, message)
        ordered = sorted(signers, key=lambda w: int(w.address, 16))
        return [w.sign_hash(digest) for w in ordered]

    # -- shortcuts -------------------------------------------------------------------

    def balance(self, wallet: Wallet | str) -> int:
        address = wallet if isinstance(wallet, str) else wallet.address
        return int(self.fn.balanceOf(address).call())

    def deposit(self, wallet: Wallet, credits: int) -> int:
        return int(self.send(self.fn.deposit(), wallet, value=credits * self.rules.credit_wei))

    def open(self, payer: Wallet, payee: Wallet, amount: int) -> bytes:
        return bytes(self.send(self.fn.openChannel(payee.address, amount), payer))

    def channel(self, channel_id: bytes) -> dict[str, Any]:
        names = ("payer", "payee", "deposit", "redeemed", "nonce", "state", "closes_at", "refunded")
        return dict(zip(names, self.fn.channel(channel_id).call()))

    def node(self, wallet: Wallet | str) -> dict[str, Any]:
        address = wallet if isinstance(wallet, str) else wallet.address
        names = (
            "stake", "blocks", "registered_at", "rewarded_until", "served_at", "earned",
            "rewards", "unstaking", "unstake_at", "payout",
        )
        return dict(zip(names, self.fn.node(address).call()))

    def assert_backed(self) -> None:
        """The contract holds exactly ``creditWei`` wei for every credit it owes (balances,
        unspent channel deposits, stakes, what is unstaking, the reward pool) or burned."""
        events = self.contract.events
        channel_ids, burned = set(), 0
        for receipt in self.receipts[1:]:
            for log in events.ChannelOpened().process_receipt(receipt, errors=DISCARD):
                channel_ids.add(bytes(log["args"]["id"]))
            for log in events.Slashed().process_receipt(receipt, errors=DISCARD):
                burned += log["args"]["burned"]
        owed = int(self.fn.rewardPool().call())
        for wallet in self.evm.wallets:
            node = self.node(wallet)
            owed += self.balance(wallet) + node["stake"] + node["unstaking"]
        for channel_id in channel_ids:
            channel = self.channel(channel_id)
            owed += channel["deposit"] - channel["redeemed"] - channel["refunded"]
        assert self.evm.w3.eth.get_balance(self.address) == (owed + burned) * self.rules.credit_wei

    def redeem(self, payer: Wallet, channel_id: bytes, nonce: int, amount: int, submitter: Wallet) -> int:
        sig = self.voucher(payer, channel_id, nonce, amount)
        return int(self.send(self.fn.redeem(channel_id, nonce, amount, sig), submitter))


def _typed_digest(domain: dict[str, Any], primary: str, fields: list[dict[str, str]], message: dict[str, Any]) -> bytes:
    signable = encode_typed_data(
        full_message={
            "types": {"EIP712Domain": DOMAIN_TYPE, primary: fields},
            "primaryType": primary,
            "domain": domain,
            "message": message,
        }
    )
    return keccak256(b"\x19" + signable.version + signable.header + signable.body)


def _revert_data(error: TransactionFailed) -> bytes:
    """The raw revert bytes eth-tester puts in an ``eth_call`` failure's message."""
    text = str(error.args[0]).removeprefix("execution reverted: ")
    data = ast.literal_eval(text)
    assert isinstance(data, bytes), text
    return data


def _high_s(signature: bytes) -> bytes:
    """The malleable twin of a valid signature: (r, n - s, v flipped) recovers to the same key."""
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])


def _receipt(node: Wallet, step: int = 0) -> tuple[bytes, bytes]:
    """(284 canonical bytes, the node's EIP-191 signature) of a receipt signed by ``node``."""
    receipt = Receipt(
        session_id="session-1", step=step, model_id="model", start=0, end=4, tokens=1,
        input_sha256=bytes(32), output_sha256=b"\x01" * 32, price_per_block=2, amount=8,
        prev_hash=ZERO_HASH, node_address=node.address, fingerprint=b"\x07" * 16,
    )
    signed = sign_receipt(node, receipt)
    return receipt.canonical_bytes(), signed.signature


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def evm() -> Evm:
    provider = EthereumTesterProvider()
    w3 = Web3(provider)
    keys = provider.ethereum_tester.backend.account_keys
    return Evm(w3, provider, [Wallet(key.to_bytes()) for key in keys])


def deploy(evm: Evm, rules: Rules = Rules(), referees: list[Wallet] | None = None) -> Deployed:
    artifact = load_artifact()
    referees = referees if referees is not None else [evm.wallets[0]]
    factory = evm.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx = factory.constructor(*rules.args([w.address for w in referees])).transact(
        {"from": evm.wallets[0].address}
    )
    receipt = evm.w3.eth.wait_for_transaction_receipt(tx)
    contract = evm.w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"])
    return Deployed(evm, contract, rules, referees, [receipt])


@pytest.fixture
def chain(evm: Evm) -> Deployed:
    return deploy(evm)


@pytest.fixture
def people(evm: Evm) -> dict[str, Wallet]:
    w = evm.wallets
    return {"client": w[1], "node": w[2], "node2": w[3], "accuser": w[4], "stranger": w[7], "owner": w[8]}


# --------------------------------------------------------------------------- accounts


def test_domain_and_config_are_the_deployments(chain: Deployed, evm: Evm) -> None:
    assert bytes(chain.fn.domainSeparator().call()) == hash_domain(chain.domain())
    rules = chain.rules
    assert chain.fn.config().call() == [
        rules.credit_wei, rules.dispute_window_s, rules.reward_per_block_hour, rules.min_stake,
        rules.max_reward_period_s, rules.max_blocks, rules.stake_yield_bps, rules.accuser_bond,
        rules.slash_bps, rules.slash_reward_bps, rules.unstake_delay_s, rules.quorum,
    ]
    assert chain.fn.isReferee(evm.wallets[0].address).call()
    assert not chain.fn.isReferee(evm.wallets[1].address).call()
    other = deploy(evm)  # same chain, another address: another domain
    assert other.fn.domainSeparator().call() != chain.fn.domainSeparator().call()


def test_constructor_refuses_a_quorum_no_referee_set_can_reach(evm: Evm) -> None:
    artifact = load_artifact()
    factory = evm.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    referee = [evm.wallets[0].address]
    for rules, referees in ((Rules(quorum=2), referee), (Rules(quorum=0), []),
                            (Rules(max_blocks=0), referee), (Rules(stake_yield_bps=10_001), referee)):
        with pytest.raises(TransactionFailed):
            factory.constructor(*rules.args(referees)).transact({"from": evm.wallets[0].address})


def test_deposit_and_withdraw_move_ether_at_the_credit_rate(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    client = people["client"]
    assert chain.deposit(client, 5_000) == 5_000
    assert chain.deposit(client, 1) == 5_001
    assert chain.balance(client) == 5_001
    assert evm.w3.eth.get_balance(chain.address) == 5_001 * CREDIT_WEI

    args = chain.reverts(chain.fn.deposit(), client, "BadAmount", value=CREDIT_WEI + 1)
    assert "multiple of creditWei" in args[0]
    chain.reverts(chain.fn.deposit(), client, "BadAmount", value=0)

    before = evm.w3.eth.get_balance(client.address)
    assert chain.send(chain.fn.withdraw(2_000), client) == 3_001
    receipt = chain.receipts[-1]
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert evm.w3.eth.get_balance(client.address) == before + 2_000 * CREDIT_WEI - fee
    assert evm.w3.eth.get_balance(chain.address) == 3_001 * CREDIT_WEI
    assert chain.reverts(chain.fn.withdraw(3_002), client, "InsufficientFunds") == (3_001, 3_002)
    chain.reverts(chain.fn.withdraw(0), client, "BadAmount")
    assert chain.reverts(chain.fn.withdraw(1), people["stranger"], "InsufficientFunds") == (0, 1)
    chain.assert_backed()


# --------------------------------------------------------------------------- channels


def test_open_top_up_and_redeem(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    client, node = people["client"], people["node"]
    chain.deposit(client, 1_000)
    channel_id = chain.open(client, node, 300)
    expected_id = keccak256(
        abi_encode(["uint256", "address", "address", "uint64"], [evm.w3.eth.chain_id, chain.address, client.address, 1])
    )
    assert channel_id == expected_id
    assert chain.fn.channelNonce(client.address).call() == 1
    assert chain.balance(client) == 700
    assert chain.channel(channel_id) == {
        "payer": client.address, "payee": node.address, "deposit": 300, "redeemed": 0,
        "nonce": 0, "state": 1, "closes_at": 0, "refunded": 0,
    }
    second = chain.open(client, node, 100)  # a second channel to the same node: a new id
    assert second != channel_id and chain.fn.channelNonce(client.address).call() == 2

    # anyone may submit a voucher: it only pays the payee
    assert chain.redeem(client, channel_id, 1, 40, submitter=people["stranger"]) == 40
    assert chain.balance(node) == 40
    assert chain.redeem(client, channel_id, 3, 100, submitter=node) == 60
    assert chain.balance(node) == 100
    # replayed, older and not-larger vouchers credit 0 and change nothing
    assert chain.redeem(client, channel_id, 3, 100, submitter=node) == 0
    assert chain.redeem(client, channel_id, 2, 90, submitter=node) == 0
    assert chain.redeem(client, channel_id, 4, 100, submitter=node) == 0
    assert chain.channel(channel_id)["nonce"] == 3 and chain.channel(channel_id)["redeemed"] == 100

    # more than the deposit reverts, until a top-up covers it
    sig = chain.voucher(client, channel_id, 5, 350)
    assert "exceeds the channel deposit" in chain.reverts(chain.fn.redeem(channel_id, 5, 350, sig), node, "BadVoucher")[0]
    assert chain.send(chain.fn.topUp(channel_id, 100), client) == 400
    assert chain.balance(client) == 500
    assert chain.send(chain.fn.redeem(channel_id, 5, 350, sig), node) == 250
    assert chain.balance(node) == 350

    chain.reverts(chain.fn.topUp(channel_id, 10), node, "ChannelState")  # only the payer
    chain.reverts(chain.fn.topUp(channel_id, 10_000), client, "InsufficientFunds")
    chain.reverts(chain.fn.openChannel(client.address, 10), client, "ChannelState")  # to itself
    chain.reverts(chain.fn.openChannel("0x" + "00" * 20, 10), client, "ChannelState")
    chain.reverts(chain.fn.openChannel(node.address, 10_000), client, "InsufficientFunds")
    chain.reverts(chain.fn.openChannel(node.address, 0), client, "BadAmount")
    chain.reverts(chain.fn.openChannel(node.address, 2**64), client, "BadAmount")
    unknown = b"\x01" * 32
    sig = chain.voucher(client, unknown, 1, 1)
    chain.reverts(chain.fn.redeem(unknown, 1, 1, sig), node, "ChannelState")
    chain.assert_backed()


def test_forged_foreign_and_malleable_vouchers_revert(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    client, node, stranger = people["client"], people["node"], people["stranger"]
    chain.deposit(client, 1_000)
    channel_id = chain.open(client, node, 500)
    other_channel = chain.open(client, node, 500)

    def refused(sig: bytes, why: str, channel: bytes = channel_id) -> None:
        args = chain.reverts(chain.fn.redeem(channel, 1, 100, sig), node, "BadVoucher")
        assert why in args[0]

    # signed by someone other than the payer (the payee itself, a stranger)
    refused(chain.voucher(stranger, channel_id, 1, 100), "not signed by the channel's payer")
    refused(chain.voucher(node, channel_id, 1, 100), "not signed by the channel's payer")
    # the payer's signature, for another deployment: another contract on this chain...
    other = deploy(evm)
    refused(chain.voucher(client, channel_id, 1, 100, contract=other.address), "not signed by")
    # ...or this contract's address on another chain
    refused(chain.voucher(client, channel_id, 1, 100, chain_id=1), "not signed by")
    # the payer's voucher for one channel does not pay another
    refused(chain.voucher(client, other_channel, 1, 100), "not signed by")
    # the malleable twin of a valid signature (high s) and malformed signatures
    valid = chain.voucher(client, channel_id, 1, 100)
    refused(_high_s(valid), "malformed signature")
    refused(valid[:64] + bytes([valid[64] - 27]), "malformed signature")  # v in {0, 1}
    refused(valid[:64], "malformed signature")
    refused(b"", "malformed signature")
    assert chain.channel(channel_id)["redeemed"] == 0 and chain.balance(node) == 0
    assert chain.send(chain.fn.redeem(channel_id, 1, 100, valid), node) == 100


def test_redeem_many_settles_a_nodes_channels_in_one_transaction(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    node = people["node"]
    payers = [people["client"], people["accuser"], people["owner"]]
    channels = []
    for payer in payers:
        chain.deposit(payer, 1_000)
        channels.append(chain.open(payer, node, 200))
    chain.redeem(payers[2], channels[2], 5, 50, submitter=node)

    def voucher(i: int, nonce: int, amount: int, signer: Wallet | None = None) -> tuple[bytes, int, int, bytes]:
        return (channels[i], nonce, amount, chain.voucher(signer or payers[i], channels[i], nonce, amount))

    batch = [voucher(0, 1, 30), voucher(1, 1, 70), voucher(2, 4, 60), voucher(0, 2, 45)]
    # channel 2's voucher is older than the one redeemed (nonce 4 <= 5): it credits 0
    assert chain.send(chain.fn.redeemMany(batch), node) == 30 + 70 + 15
    assert chain.balance(node) == 50 + 115
    assert [chain.channel(c)["redeemed"] for c in channels] == [45, 70, 50]
    # the same batch again credits nothing
    assert chain.send(chain.fn.redeemMany(batch), node) == 0
    assert chain.balance(node) == 165

    # one bad voucher reverts the whole batch: nothing of it is credited
    for bad, error in (
        (voucher(1, 2, 201), "BadVoucher"),  # above the deposit
        (voucher(1, 2, 100, signer=people["stranger"]), "BadVoucher"),
        (voucher(1, 2, 100)[:3] + (_high_s(voucher(1, 2, 100)[3]),), "BadVoucher"),
    ):
        chain.reverts(chain.fn.redeemMany([voucher(0, 3, 60), bad]), node, error)
    assert chain.balance(node) == 165 and chain.channel(channels[0])["redeemed"] == 45
    assert chain.send(chain.fn.redeemMany([]), node) == 0
    chain.assert_backed()


def test_close_waits_out_the_dispute_window(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    client, node = people["client"], people["node"]
    chain.deposit(client, 1_000)
    channel_id = chain.open(client, node, 400)
    chain.redeem(client, channel_id, 1, 100, submitter=node)
    late = chain.voucher(client, channel_id, 2, 150)  # signed, not redeemed yet

    chain.reverts(chain.fn.closeChannel(channel_id), node, "ChannelState")  # payer only
    assert chain.send(chain.fn.closeChannel(channel_id), client) == 0
    closes_at = chain.now() + chain.rules.dispute_window_s
    assert chain.channel(channel_id)["state"] == 2 and chain.channel(channel_id)["closes_at"] == closes_at
    assert chain.balance(client) == 600  # nothing refunded yet

    # the payee still redeems during the window; the payer cannot top up or settle early
    assert chain.send(chain.fn.redeem(channel_id, 2, 150, late), node) == 50
    chain.reverts(chain.fn.topUp(channel_id, 10), client, "ChannelState")
    evm.travel(chain.rules.dispute_window_s - 60)
    assert "dispute window" in chain.reverts(chain.fn.closeChannel(channel_id), client, "ChannelState")[0]

    evm.travel(120)
    assert chain.send(chain.fn.closeChannel(channel_id), client) == 250
    assert chain.balance(client) == 850 and chain.balance(node) == 150
    assert chain.channel(channel_id)["state"] == 3 and chain.channel(channel_id)["refunded"] == 250
    # closed is final: no redemption, no second refund
    later = chain.voucher(client, channel_id, 3, 400)
    assert "closed" in chain.reverts(chain.fn.redeem(channel_id, 3, 400, later), node, "ChannelState")[0]
    chain.reverts(chain.fn.closeChannel(channel_id), client, "ChannelState")
    assert chain.balance(client) + chain.balance(node) == 1_000  # credits conserved
    chain.assert_backed()


def test_zero_dispute_window_closes_at_once(evm: Evm, people: dict[str, Wallet]) -> None:
    chain = deploy(evm, Rules(dispute_window_s=0))
    client, node = people["client"], people["node"]
    chain.deposit(client, 100)
    channel_id = chain.open(client, node, 100)
    chain.redeem(client, channel_id, 1, 30, submitter=node)
    assert chain.send(chain.fn.closeChannel(channel_id), client) == 70
    assert chain.channel(channel_id)["state"] == 3 and chain.balance(client) == 70


# ------------------------------------------------------------------------------ nodes


def test_register_and_unstake_after_the_delay(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    node = people["node"]
    chain.deposit(node, 1_000)
    chain.reverts(chain.fn.registerNode(0, 4), node, "NodeState")  # no stake
    chain.reverts(chain.fn.registerNode(50, 4), node, "NodeState")  # under minStake 100
    chain.reverts(chain.fn.registerNode(200, 0), node, "NodeState")  # no blocks
    chain.reverts(chain.fn.registerNode(2_000, 4), node, "InsufficientFunds")
    assert chain.send(chain.fn.registerNode(200, 4), node) == 200
    registered = chain.now()
    assert chain.balance(node) == 800
    info = chain.node(node)
    assert (info["stake"], info["blocks"], info["registered_at"], info["rewarded_until"]) == (200, 4, registered, registered)
    assert chain.send(chain.fn.registerNode(0, 8), node) == 200  # change the blocks only
    assert chain.node(node)["blocks"] == 8 and chain.node(node)["rewarded_until"] == chain.now()
    evm.travel(60)
    assert chain.send(chain.fn.registerNode(300, 8), node) == 500
    assert chain.node(node)["rewarded_until"] == chain.now()  # more stake counts from now

    chain.reverts(chain.fn.requestUnstake(501), node, "InsufficientFunds")
    chain.reverts(chain.fn.requestUnstake(450), node, "NodeState")  # 50 left: under minStake
    chain.reverts(chain.fn.requestUnstake(1), people["stranger"], "NotRegistered")
    chain.reverts(chain.fn.completeUnstake(), node, "NodeState")  # nothing unstaking
    chain.send(chain.fn.requestUnstake(400), node)
    info = chain.node(node)
    assert (info["stake"], info["unstaking"], info["unstake_at"]) == (100, 400, chain.now() + chain.rules.unstake_delay_s)
    assert chain.balance(node) == 500  # not spendable yet
    evm.travel(chain.rules.unstake_delay_s - 60)
    assert "not over" in chain.reverts(chain.fn.completeUnstake(), node, "NodeState")[0]
    evm.travel(120)
    assert chain.send(chain.fn.completeUnstake(), node) == 400
    assert chain.balance(node) == 900 and chain.node(node)["unstaking"] == 0
    chain.assert_backed()


def test_rewards_are_bounded_by_attested_uptime_and_paid_from_the_pool(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    rules, client, node = chain.rules, people["client"], people["node"]
    chain.deposit(client, 100_000)
    chain.deposit(node, 10_000_000)
    # 10^7 staked at 100 % a year: 27,397 credits a day, above every bound tested here
    chain.send(chain.fn.registerNode(10_000_000, 4), node)
    registered = chain.now()
    channel_id = chain.open(client, node, 50_000)

    # time alone earns nothing: uptime counts only as far as clients' vouchers attest it
    evm.travel(2 * HOUR)
    chain.reverts(chain.fn.claimReward(), node, "RewardNotDue")
    chain.redeem(client, channel_id, 1, 10_000, submitter=node)
    served = chain.now()
    assert chain.node(node)["served_at"] == served and chain.node(node)["earned"] == 10_000

    by_time = rules.reward_per_block_hour * 4 * (served - registered) // HOUR
    assert 0 < by_time < 10_000
    assert chain.reverts(chain.fn.claimReward(), node, "RewardPoolEmpty") == (0, by_time)
    chain.send(chain.fn.fundRewards(), people["owner"], value=100_000 * CREDIT_WEI)
    assert chain.fn.rewardPool().call() == 100_000
    evm.travel(HOUR)  # time after the last voucher does not count
    before = chain.balance(node)
    assert chain.send(chain.fn.claimReward(), node) == by_time
    assert chain.balance(node) == before + by_time
    assert chain.fn.rewardPool().call() == 100_000 - by_time
    info = chain.node(node)
    assert (info["rewarded_until"], info["earned"], info["rewards"]) == (served, 0, by_time)
    chain.reverts(chain.fn.claimReward(), node, "RewardNotDue")  # once per attested period

    # bounded by what clients paid in the period...
    evm.travel(10 * HOUR)
    chain.redeem(client, channel_id, 2, 10_005, submitter=node)
    assert chain.send(chain.fn.claimReward(), node) == 5
    # ...and by maxRewardPeriodS of time, however long ago the last reward was
    last = chain.node(node)["rewarded_until"]
    evm.travel(3 * rules.max_reward_period_s)
    chain.redeem(client, channel_id, 3, 40_000, submitter=node)
    capped = rules.reward_per_block_hour * 4 * rules.max_reward_period_s // HOUR
    assert chain.send(chain.fn.claimReward(), node) == capped
    assert chain.node(node)["rewarded_until"] == last + rules.max_reward_period_s
    chain.reverts(chain.fn.claimReward(), people["stranger"], "NotRegistered")
    chain.assert_backed()


def test_payout_address_receives_redemptions_and_rewards(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    client, node, owner = people["client"], people["node"], people["owner"]
    chain.deposit(client, 10_000)
    chain.deposit(node, 1_000_000)
    chain.send(chain.fn.registerNode(1_000_000, 2), node)  # its yield: 114 credits an hour
    chain.send(chain.fn.fundRewards(), client, value=1_000 * CREDIT_WEI)
    chain.send(chain.fn.setPayout(owner.address), node)
    assert chain.node(node)["payout"] == owner.address
    channel_id = chain.open(client, node, 5_000)
    evm.travel(HOUR)
    chain.redeem(client, channel_id, 1, 500, submitter=node)
    assert (chain.balance(owner), chain.balance(node)) == (500, 0)
    assert chain.node(node)["earned"] == 500  # the work is the node's; the credits its owner's
    reward = chain.send(chain.fn.claimReward(), node)
    assert reward > 0 and chain.balance(owner) == 500 + reward and chain.balance(node) == 0
    chain.send(chain.fn.setPayout(node.address), node)  # itself: back to 0
    assert chain.node(node)["payout"] == "0x" + "00" * 20
    chain.redeem(client, channel_id, 2, 600, submitter=node)
    assert chain.balance(node) == 100
    chain.assert_backed()


def test_self_dealing_cannot_drain_the_reward_pool(evm: Evm, people: dict[str, Wallet]) -> None:
    """E1's attack: a node registers 2^32-1 blocks, its owner's sock puppet pays it 500,000
    credits (free: they come back to the same owner) and the node claims. The old rule,
    min(rate x blocks x hours, earned), paid the whole 500,000 out of the pool. Now the
    blocks are refused above maxBlocks, and the claim pays at most the stake's yield."""
    rules = Rules(reward_per_block_hour=60, stake_yield_bps=1_000)  # 10 % a year
    chain = deploy(evm, rules)
    node, puppet = people["node"], people["owner"]
    chain.send(chain.fn.fundRewards(), people["client"], value=1_000_000 * CREDIT_WEI)
    stake = 1_000_000
    chain.deposit(node, stake)
    for blocks in (2**32 - 1, rules.max_blocks + 1):
        reason = chain.reverts(chain.fn.registerNode(stake, blocks), node, "NodeState")[0]
        assert "maxBlocks" in reason
    chain.send(chain.fn.registerNode(stake, rules.max_blocks), node)
    chain.deposit(puppet, 500_000)
    channel_id = chain.open(puppet, node, 500_000)
    evm.travel(HOUR)
    chain.redeem(puppet, channel_id, 1, 500_000, submitter=node)
    info = chain.node(node)
    period = info["served_at"] - info["rewarded_until"]
    old_rule = min(rules.reward_per_block_hour * rules.max_blocks * period // HOUR, info["earned"])
    yield_cap = stake * rules.stake_yield_bps * period // (10_000 * 365 * 24 * HOUR)
    assert chain.send(chain.fn.claimReward(), node) == yield_cap
    assert 0 < yield_cap < old_rule // 1_000  # 11 credits, where the old rule paid 61,440
    assert chain.fn.rewardPool().call() == 1_000_000 - yield_cap
    # the owner (node + puppet) is up by the stake's yield and nothing else
    assert chain.balance(node) + chain.balance(puppet) == 500_000 + yield_cap
    # a second claim needs new payments
    chain.reverts(chain.fn.claimReward(), node, "RewardNotDue")
    chain.assert_backed()


# ---------------------------------------------------------------------------- slashing


def _staked(chain: Deployed, people: dict[str, Wallet], stake: int = 1_000) -> None:
    chain.deposit(people["node"], stake)
    chain.send(chain.fn.registerNode(stake, 4), people["node"])
    chain.deposit(people["accuser"], chain.rules.accuser_bond)


def test_guilty_verdict_slashes_the_stake_once(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    node, accuser = people["node"], people["accuser"]
    _staked(chain, people)
    receipt, receipt_sig = _receipt(node)
    evidence = keccak256(b"the evidence file")
    sigs = chain.verdict_sigs(chain.referees, evidence=evidence, accuser=accuser, accused=node.address, receipt=receipt, guilty=True)
    call = chain.fn.slash(receipt, receipt_sig, evidence, True, sigs)
    assert chain.send(call, accuser) == 500  # slashBps 50% of 1000
    assert chain.node(node)["stake"] == 500
    assert chain.balance(accuser) == chain.rules.accuser_bond + 200  # 40% of the slashed credits
    assert chain.fn.convicted(keccak256(receipt)).call()
    event = chain.contract.events.Slashed().process_receipt(chain.receipts[-1])[0]["args"]
    assert (event["accused"], event["guilty"], event["slashed"], event["reward"], event["burned"], event["bond"]) == (
        node.address, True, 500, 200, 300, 0,
    )
    # the same receipt convicts once, whatever evidence hash comes with it
    again = chain.verdict_sigs(chain.referees, evidence=keccak256(b"other"), accuser=accuser, accused=node.address, receipt=receipt, guilty=True)
    args = chain.reverts(chain.fn.slash(receipt, receipt_sig, keccak256(b"other"), True, again), accuser, "BadEvidence")
    assert "already convicted" in args[0]
    assert chain.node(node)["stake"] == 500
    chain.assert_backed()


def test_stake_being_unstaked_is_still_slashable(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    node, accuser = people["node"], people["accuser"]
    _staked(chain, people)
    chain.send(chain.fn.requestUnstake(1_000), node)  # a cheat tries to leave with its stake
    receipt, receipt_sig = _receipt(node)
    evidence = keccak256(b"evidence")
    sigs = chain.verdict_sigs(chain.referees, evidence=evidence, accuser=accuser, accused=node.address, receipt=receipt, guilty=True)
    assert chain.send(chain.fn.slash(receipt, receipt_sig, evidence, True, sigs), accuser) == 500
    evm.travel(chain.rules.unstake_delay_s + 1)
    assert chain.send(chain.fn.completeUnstake(), node) == 500
    chain.assert_backed()


def test_forged_accusations_revert(evm: Evm, people: dict[str, Wallet]) -> None:
    referees = [evm.wallets[0], evm.wallets[5], evm.wallets[6]]
    chain = deploy(evm, Rules(quorum=2), referees)
    node, accuser, stranger = people["node"], people["accuser"], people["stranger"]
    _staked(chain, people)
    receipt, receipt_sig = _receipt(node)
    evidence = keccak256(b"evidence")

    def sigs(signers: list[Wallet], **changes: Any) -> list[bytes]:
        args: dict[str, Any] = {"evidence": evidence, "accuser": accuser, "accused": node.address, "receipt": receipt, "guilty": True}
        args.update(changes)
        return chain.verdict_sigs(signers, **args)

    def refused(why: str, *, receipt_: bytes = receipt, receipt_sig_: bytes = receipt_sig, verdict: list[bytes] | None = None, by: Wallet = accuser) -> None:
        verdict = sigs(referees[:2]) if verdict is None else verdict
        args = chain.reverts(chain.fn.slash(receipt_, receipt_sig_, evidence, True, verdict), by, "BadEvidence")
        assert why in args[0], args

    # a receipt that names the node but is signed by someone else
    forged = Receipt(
        session_id="session-1", step=0, model_id="model", start=0, end=4, tokens=1,
        input_sha256=bytes(32), output_sha256=b"\x01" * 32, price_per_block=2, amount=8,
        prev_hash=ZERO_HASH, node_address=stranger.address, fingerprint=b"\x07" * 16,
    )
    stranger_sig = sign_receipt(stranger, forged).signature
    refused("not signed by the node it names", receipt_sig_=stranger_sig)
    refused("not signed by the node it names", receipt_sig_=_high_s(receipt_sig))
    tampered = receipt[:100] + bytes([receipt[100] ^ 1]) + receipt[101:]  # another step's hashes
    refused("not signed by the node it names", receipt_=tampered)
    refused("284 canonical bytes", receipt_=receipt + b"\x00")
    # verdicts: not a referee's, short of the quorum, one referee twice, out of order
    refused("not a referee's", verdict=sigs([referees[0], stranger]))
    refused("quorum", verdict=sigs(referees[:1]))
    duplicated = sigs(referees[:1])
    refused("distinct", verdict=duplicated + duplicated)
    refused("distinct", verdict=list(reversed(sigs(referees[:2]))))
    # a verdict signed for something else: not guilty, another accuser, another deployment
    refused("not a referee's", verdict=sigs(referees[:2], guilty=False))
    chain.deposit(stranger, chain.rules.accuser_bond)
    refused("not a referee's", verdict=sigs(referees[:2]), by=stranger)  # stolen verdict
    refused("not a referee's", verdict=sigs(referees[:2], contract=deploy(evm).address))
    refused("not a referee's", verdict=sigs(referees[:2], chain_id=1))
    # a node cannot accuse itself, an accuser without the bond cannot accuse
    chain.deposit(node, chain.rules.accuser_bond)
    refused("accuse itself", verdict=sigs(referees[:2], accuser=node), by=node)
    poor = evm.wallets[9]
    args = chain.reverts(
        chain.fn.slash(receipt, receipt_sig, evidence, True, sigs(referees[:2], accuser=poor)), poor, "InsufficientFunds"
    )
    assert args == (0, chain.rules.accuser_bond)
    assert chain.node(node)["stake"] == 1_000 and chain.balance(accuser) == chain.rules.accuser_bond
    # the real verdict of two referees (any two) goes through
    assert chain.send(chain.fn.slash(receipt, receipt_sig, evidence, True, sigs(referees[1:])), accuser) == 500
    chain.assert_backed()


def test_not_guilty_pays_the_bond_to_the_accused(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    node, accuser = people["node"], people["accuser"]
    _staked(chain, people)
    receipt, receipt_sig = _receipt(node)
    evidence = keccak256(b"weak evidence")
    sigs = chain.verdict_sigs(chain.referees, evidence=evidence, accuser=accuser, accused=node.address, receipt=receipt, guilty=False)
    bond = chain.rules.accuser_bond
    assert chain.send(chain.fn.slash(receipt, receipt_sig, evidence, False, sigs), accuser) == bond
    assert chain.balance(accuser) == 0 and chain.balance(node) == bond
    assert chain.node(node)["stake"] == 1_000 and not chain.fn.convicted(keccak256(receipt)).call()
    # the accuser no longer holds a bond: it cannot accuse again
    chain.reverts(chain.fn.slash(receipt, receipt_sig, evidence, False, sigs), accuser, "InsufficientFunds")
    chain.assert_backed()


def test_balances_rebuild_from_events(chain: Deployed, evm: Evm, people: dict[str, Wallet]) -> None:
    """The events carry every credit movement: replaying them gives the stored balances."""
    client, node, owner = people["client"], people["node"], people["owner"]
    chain.deposit(client, 2_000)
    chain.deposit(node, 500)
    chain.send(chain.fn.registerNode(300, 2), node)
    channel_id = chain.open(client, node, 1_000)
    chain.redeem(client, channel_id, 1, 400, submitter=node)
    chain.send(chain.fn.setPayout(owner.address), node)
    chain.redeem(client, channel_id, 2, 700, submitter=node)
    chain.send(chain.fn.withdraw(100), node)
    chain.send(chain.fn.closeChannel(channel_id), client)
    evm.travel(chain.rules.dispute_window_s + 1)
    chain.send(chain.fn.closeChannel(channel_id), client)

    balances: dict[str, int] = {}
    payout: dict[str, str] = {}
    payer: dict[bytes, str] = {}

    def add(address: str, amount: int) -> None:
        balances[address] = balances.get(address, 0) + amount

    events = chain.contract.events
    for receipt in chain.receipts[1:]:
        for kind in ("Deposited", "Withdrawn", "ChannelOpened", "NodeRegistered", "PayoutSet", "Redeemed", "ChannelClosed"):
            for log in getattr(events, kind)().process_receipt(receipt, errors=DISCARD):
                a = log["args"]
                if kind == "Deposited":
                    add(a["account"], a["credits"])
                elif kind == "Withdrawn":
                    add(a["account"], -a["credits"])
                elif kind == "ChannelOpened":
                    add(a["payer"], -a["deposit"])
                    payer[bytes(a["id"])] = a["payer"]
                elif kind == "NodeRegistered":
                    pass  # the stake is the running total; the first registration staked 300
                elif kind == "PayoutSet":
                    payout[a["node"]] = a["payout"]
                elif kind == "Redeemed":
                    add(payout.get(a["payee"], a["payee"]), a["credited"])
                else:
                    add(payer[bytes(a["id"])], a["refund"])
    add(node.address, -300)  # NodeRegistered(stake 300) moved it from the balance
    for address in (client.address, node.address, owner.address):
        assert balances.get(address, 0) == chain.balance(address)
    assert chain.balance(client) == 1_300 and chain.balance(owner) == 300 and chain.balance(node) == 500


# --------------------------------------------------------------------------------- gas


def measure_gas(evm: Evm) -> dict[str, int]:
    """Gas of each call on a fresh deployment (per voucher for ``redeem_many_N``)."""
    w = evm.wallets
    chain = deploy(evm)
    gas = {"deploy": int(chain.receipts[0]["gasUsed"])}
    node, accuser = w[2], w[4]
    payers = [w[1], w[3], w[5], w[6]]
    chain.deposit(payers[0], 100_000)
    gas["deposit"] = chain.gas()
    for payer in payers[1:]:
        chain.deposit(payer, 100_000)
    chain.deposit(node, 10**9 + 10_000)  # a balance left: redemptions add to a non-zero slot
    chain.send(chain.fn.registerNode(10**9, 8), node)  # its yield: 31 credits a second
    gas["register_node"] = chain.gas()
    channels = []
    for i in range(1 + 1 + 4 + 16):
        payer = payers[i % len(payers)]
        channels.append((payer, chain.open(payer, node, 1_000)))
    gas["open_channel"] = chain.gas()
    payer, channel_id = channels[0]
    chain.redeem(payer, channel_id, 1, 10, submitter=node)
    gas["redeem"] = chain.gas()  # a channel's first redemption
    chain.redeem(payer, channel_id, 2, 20, submitter=node)
    gas["redeem_again"] = chain.gas()
    start = 1
    for n in (1, 4, 16):  # channels' first redemptions, then their second ones
        group = channels[start:start + n]
        for nonce in (1, 2):
            batch = [(c, nonce, 10 * nonce, chain.voucher(p, c, nonce, 10 * nonce)) for p, c in group]
            chain.send(chain.fn.redeemMany(batch), node)
            gas[f"redeem_many_{n}_per_voucher" + ("_again" if nonce == 2 else "")] = chain.gas() // n
        start += n
    chain.send(chain.fn.topUp(channel_id, 100), payer)
    gas["top_up"] = chain.gas()
    chain.send(chain.fn.closeChannel(channel_id), payer)
    gas["close_request"] = chain.gas()
    evm.travel(chain.rules.dispute_window_s + 1)
    chain.send(chain.fn.closeChannel(channel_id), payer)
    gas["close_settle"] = chain.gas()
    chain.send(chain.fn.fundRewards(), payers[0], value=100_000 * CREDIT_WEI)
    chain.send(chain.fn.claimReward(), node)
    gas["claim_reward"] = chain.gas()
    chain.send(chain.fn.withdraw(100), payers[1])
    gas["withdraw"] = chain.gas()
    chain.deposit(accuser, chain.rules.accuser_bond)
    receipt, receipt_sig = _receipt(node)
    evidence = keccak256(b"evidence")
    sigs = chain.verdict_sigs(chain.referees, evidence=evidence, accuser=accuser, accused=node.address, receipt=receipt, guilty=True)
    chain.send(chain.fn.slash(receipt, receipt_sig, evidence, True, sigs), accuser)
    gas["slash"] = chain.gas()
    return gas


def test_gas_figures(evm: Evm) -> None:
    """Batching is what makes per-node channels affordable: a voucher in a batch of 16
    costs well under half of a lone redemption (the 21,000 base and the contract's warm-up
    are shared). Ceilings catch a change that makes a call grossly dearer."""
    gas = measure_gas(evm)
    assert gas["redeem_many_16_per_voucher_again"] * 2 < gas["redeem_again"]
    assert gas["redeem_many_16_per_voucher"] < gas["redeem_many_4_per_voucher"] < gas["redeem_many_1_per_voucher"]
    ceilings = {
        "deploy": 3_000_000, "deposit": 50_000, "open_channel": 90_000, "redeem": 75_000,
        "redeem_again": 60_000, "redeem_many_16_per_voucher": 45_000,
        "redeem_many_16_per_voucher_again": 26_000, "close_request": 35_000,
        "close_settle": 45_000, "register_node": 100_000, "claim_reward": 70_000,
        "slash": 85_000,
    }
    for name, ceiling in ceilings.items():
        assert gas[name] < ceiling, f"{name} costs {gas[name]} gas, over {ceiling}"


if __name__ == "__main__":  # python tests/test_contract.py: the gas table of contracts/README.md
    provider = EthereumTesterProvider()
    keys = provider.ethereum_tester.backend.account_keys
    figures = measure_gas(Evm(Web3(provider), provider, [Wallet(k.to_bytes()) for k in keys]))
    for name, value in figures.items():
        print(f"| {name} | {value:,} |")
