"""Payment channels from both ends: the client's ``ChannelPayer`` and the node's ``VoucherBook``.

A client opens one channel per node on the ledger (its deposit is locked there), then with
each step signs a ``Voucher(channel_id, nonce, cumulative_amount)``: the total it owes the
node so far, with a nonce one higher than the last. Vouchers are cumulative, so the node
only ever needs the latest; it redeems that on the ledger at session end, periodically,
or with ``layerchain ledger redeem``.

Vouchers are EIP-712 typed data under the ledger's ``domain_separator``: one signed for
another ledger (another SQLite file, another contract or chain) is refused.

The node checks each voucher before serving (``VoucherBook.accept``): signed by the
channel's payer for this ledger, nonce above the last, amount not going down nor above the deposit, and
covering what the node has served (``owed_total``) less an allowed ``max_unpaid``. A
session whose vouchers fall behind gets InsufficientFunds and is no longer served. The
node re-reads a channel's ledger state at most ``recheck_s`` old before serving on it: once
its payer asks to close it (the refund of the unspent deposit is coming), nothing more is
served on it, and the node redeems within the dispute window.

Storage: a node keeps the latest voucher of each channel at
``DATA_DIR/vouchers/<channel_id>.bin`` (the voucher's wire bytes, replaced atomically);
``redeem_stored`` redeems them all (one ``redeem_many`` batch: one transaction on a
chain). The voucher format and ``verify_voucher`` live in
``layerchain.ledger.records`` (the ledger settles them) and are re-exported here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from layerchain.errors import ChannelError, InsufficientFunds, InvalidVoucher, LayerchainError
from layerchain.ledger.base import OPEN, Channel, Ledger
from layerchain.ledger.checkpoints import CheckpointStore
from layerchain.ledger.records import (
    Voucher,
    decode_voucher,
    sign_voucher,
    verify_voucher,
)
from layerchain.ledger.signatures import Signer, address_bytes

__all__ = [
    "ChannelPayer",
    "Redemption",
    "Voucher",
    "VoucherBook",
    "VoucherStore",
    "decode_voucher",
    "redeem_stored",
    "sign_voucher",
    "verify_voucher",
]

VOUCHER_DIR = "vouchers"  # under a node's data directory


def _key(address: str) -> str:
    """Lower-case form of an address: one dict key whatever its checksum casing."""
    return "0x" + address_bytes(address).hex()


class ChannelPayer:
    """Client side: one channel per node, and the cumulative vouchers paying into it.

    With a ``ledger`` and a ``deposit``, a channel is opened on first payment to a node;
    otherwise channels are opened with ``open`` or attached with ``attach``. Vouchers are
    signed under ``domain`` (default: the ledger's ``domain_separator``; without a ledger it
    must be given). State is in memory: a restarted client opens new channels. With ``checkpoints``, every open and
    close is followed by a checkpoint of the ledger's head signed by the wallet, kept there
    (outside the ledger file: see ``layerchain.ledger.checkpoints``).
    """

    def __init__(
        self,
        wallet: Signer,
        ledger: Ledger | None = None,
        *,
        deposit: int = 0,
        checkpoints: CheckpointStore | None = None,
        domain: bytes | None = None,  # 32-byte EIP-712 domain separator of the channels' ledger
    ) -> None:
        self.wallet, self.ledger, self.deposit = wallet, ledger, deposit
        self.domain = domain if domain is not None or ledger is None else ledger.domain_separator
        self.checkpoints = checkpoints
        self._channels: dict[str, Channel] = {}  # node address (lower case) -> channel
        self._nonce: dict[str, int] = {}
        self._cumulative: dict[str, int] = {}

    def open(self, node_address: str, deposit: int | None = None) -> Channel:
        """Open a channel to ``node_address`` on the ledger with ``deposit`` credits."""
        if self.ledger is None:
            raise ChannelError("no ledger to open a channel on")
        channel_id = self.ledger.open_channel(
            self.wallet, node_address, self.deposit if deposit is None else deposit
        )
        self._checkpoint(self.ledger)
        return self.attach(node_address, self.ledger.channel(channel_id))

    def close(self, channel_id: str) -> int:
        """Ask the ledger to close one of this payer's channels (signed with its wallet):
        the first call starts the dispute window, one after it refunds; returns the refund."""
        if self.ledger is None:
            raise ChannelError("no ledger to close a channel on")
        refund = self.ledger.close_channel(self.wallet, channel_id)
        self._checkpoint(self.ledger)
        return refund

    def _checkpoint(self, ledger: Ledger) -> None:
        if self.checkpoints is not None:
            self.checkpoints.append(ledger.checkpoint(self.wallet))

    def attach(self, node_address: str, channel: Channel) -> Channel:
        """Pay ``node_address`` through an existing ``channel`` from its redeemed state on."""
        if address_bytes(channel.payer) != address_bytes(self.wallet.address):
            raise ChannelError(f"channel {channel.channel_id[:10]}... is not paid by this wallet")
        if address_bytes(channel.payee) != address_bytes(node_address):
            raise ChannelError(f"channel {channel.channel_id[:10]}... does not pay {node_address}")
        key = _key(channel.payee)
        self._channels[key] = channel
        self._nonce[key] = channel.nonce
        self._cumulative[key] = channel.redeemed
        return channel

    def channel(self, node_address: str) -> Channel:
        """The channel paying ``node_address``, opened now if the payer has a ledger + deposit."""
        channel = self._channels.get(_key(node_address))
        if channel is not None:
            return channel
        if self.ledger is not None and self.deposit > 0:
            return self.open(node_address)
        raise ChannelError(f"no payment channel to {node_address}")

    def voucher_for(self, node_address: str, amount_delta: int) -> bytes:
        """Owe ``amount_delta`` more to the node; return the signed cumulative voucher.

        InsufficientFunds if the cumulative amount would exceed the channel's deposit.
        """
        if type(amount_delta) is not int or amount_delta < 0:
            raise InvalidVoucher(f"a payment must be a non-negative integer, got {amount_delta!r}")
        channel = self.channel(node_address)
        key = _key(node_address)
        cumulative = self._cumulative[key] + amount_delta
        if cumulative > channel.deposit:
            raise InsufficientFunds(
                f"channel to {channel.payee} holds {channel.deposit} credits, "
                f"the session owes {cumulative}",
                hint="open a channel with a larger deposit",
            )
        nonce = self._nonce[key] + 1
        if self.domain is None:
            raise ChannelError("no ledger domain to sign vouchers in: pass a ledger or domain=")
        data = sign_voucher(self.wallet, Voucher(channel.channel_id, nonce, cumulative), self.domain)
        self._nonce[key], self._cumulative[key] = nonce, cumulative
        return data

    def spent(self, node_address: str) -> int:
        """Cumulative amount promised to ``node_address``."""
        return self._cumulative.get(_key(node_address), 0)

    @property
    def total_spent(self) -> int:
        return sum(self._cumulative.values())

    def channels(self) -> list[Channel]:
        return list(self._channels.values())


class VoucherStore:
    """A node's latest voucher per channel, as files ``<dir>/<channel_id>.bin``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    @classmethod
    def for_data_dir(cls, data_dir: str | Path) -> VoucherStore:
        return cls(Path(data_dir).expanduser() / VOUCHER_DIR)

    def save(self, voucher_bytes: bytes) -> bool:
        """Keep ``voucher_bytes`` if its nonce is above the stored one; return whether kept."""
        voucher, _ = decode_voucher(voucher_bytes)
        path = self.directory / f"{voucher.channel_id}.bin"
        if path.exists():
            try:
                if decode_voucher(path.read_bytes())[0].nonce >= voucher.nonce:
                    return False
            except InvalidVoucher:
                pass  # a corrupt file is replaced
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(voucher_bytes)
        os.replace(tmp, path)  # readers see the old or the new voucher, never half of one
        return True

    def latest(self) -> list[bytes]:
        """Every stored voucher (one per channel), in file-name order."""
        if not self.directory.is_dir():
            return []
        return [p.read_bytes() for p in sorted(self.directory.glob("0x*.bin"))]


class VoucherBook:
    """Node side: the vouchers received per channel, and whether they keep up.

    ``channel_lookup`` gives a channel's ledger state (``ledger.channel``) and ``domain`` the
    ledger's EIP-712 domain separator (``ledger.domain_separator``); a state older than
    ``recheck_s`` is looked up again before a voucher on it is accepted, and a channel its
    payer asked to close is refused (ChannelError) and listed in ``closing``: the node
    should redeem it now. With a ``store``, every accepted voucher is persisted.
    """

    def __init__(
        self,
        node_address: str,
        channel_lookup: Callable[[str], Channel],
        *,
        domain: bytes,  # 32 bytes: vouchers signed for another ledger are refused
        store: VoucherStore | None = None,
        max_unpaid: int = 0,  # credits a node serves ahead of payment
        recheck_s: float = 1.0,  # seconds a channel's ledger state is trusted before re-reading
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = address_bytes(node_address)
        self.node_address = node_address
        self._lookup, self.store, self.max_unpaid = channel_lookup, store, max_unpaid
        self.domain = domain
        self.recheck_s, self._clock = recheck_s, clock
        self._channels: dict[str, tuple[Channel, float]] = {}  # id -> (state, read at)
        self._latest: dict[str, tuple[Voucher, bytes]] = {}
        self.closing: set[str] = set()  # channels seen closing whose vouchers await redemption

    def channel(self, channel_id: str, *, reread: bool = True) -> Channel:
        """The channel's ledger state; looked up on first sight and, with ``reread``, again
        when older than ``recheck_s`` (a caller that re-reads off its event loop passes
        False and calls ``update``). ChannelError once it is no longer open, InvalidVoucher
        if it pays someone else."""
        cached = self._channels.get(channel_id)
        if cached is None or (reread and self.stale(channel_id)):
            cached = (self.update(self._lookup(channel_id)), self._clock())
        channel = cached[0]
        if channel.state != OPEN:
            if channel_id in self._latest:
                self.closing.add(channel_id)
            raise ChannelError(
                f"channel {channel_id[:10]}... is {channel.state}: its payer asked for the "
                "refund, nothing more is served on it"
            )
        return channel

    def stale(self, channel_id: str) -> bool:
        """Whether the channel's state was read ``recheck_s`` ago or more (or never)."""
        cached = self._channels.get(channel_id)
        return cached is None or self._clock() - cached[1] >= self.recheck_s

    def update(self, channel: Channel) -> Channel:
        """Take ``channel`` as its state read now; InvalidVoucher if it pays someone else."""
        if address_bytes(channel.payee) != self.node:
            raise InvalidVoucher(
                f"channel {channel.channel_id[:10]}... pays {channel.payee}, not this node"
            )
        self._channels[channel.channel_id] = (channel, self._clock())
        return channel

    def accept(self, voucher_bytes: bytes, owed_total: int, *, reread: bool = True) -> Voucher:
        """Record a new voucher, then check it covers ``owed_total`` (what the node served
        on this channel, including the step about to be served).

        InvalidVoucher / ChannelError for a bad voucher (nothing recorded), InsufficientFunds
        when the voucher is valid but behind (it is recorded: it is still worth redeeming).
        """
        voucher, _ = decode_voucher(voucher_bytes)
        channel = self.channel(voucher.channel_id, reread=reread)
        last = self._latest.get(voucher.channel_id)
        voucher = verify_voucher(
            voucher_bytes,
            channel,
            self.domain,
            last_nonce=last[0].nonce if last else channel.nonce,
            last_amount=last[0].cumulative_amount if last else channel.redeemed,
        )
        self._latest[voucher.channel_id] = (voucher, voucher_bytes)
        if self.store is not None:
            self.store.save(voucher_bytes)
        self.require_paid(voucher.channel_id, owed_total)
        return voucher

    def paid(self, channel_id: str) -> int:
        """Cumulative amount of the latest accepted voucher on ``channel_id`` (0 if none)."""
        last = self._latest.get(channel_id)
        return last[0].cumulative_amount if last else 0

    def require_paid(self, channel_id: str, owed_total: int) -> None:
        """InsufficientFunds unless vouchers cover ``owed_total`` less ``max_unpaid``."""
        paid = self.paid(channel_id)
        if paid + self.max_unpaid < owed_total:
            raise InsufficientFunds(
                f"vouchers on channel {channel_id[:10]}... cover {paid} credits, "
                f"{owed_total} are owed: the session is not served further"
            )

    def latest_for(self, channel_id: str) -> bytes | None:
        """The latest accepted voucher's bytes on ``channel_id`` (None if none)."""
        last = self._latest.get(channel_id)
        return last[1] if last else None

    def latest(self) -> list[bytes]:
        """The latest voucher bytes of every channel (what to redeem)."""
        return [data for _, data in self._latest.values()]


@dataclass(frozen=True)
class Redemption:
    """The outcome of redeeming one stored voucher."""

    channel_id: str
    nonce: int
    cumulative_amount: int
    credited: int  # 0 when already redeemed
    error: str | None = None  # one line when the ledger refused it


def redeem_stored(ledger: Ledger, vouchers: list[bytes]) -> list[Redemption]:
    """Redeem the vouchers on ``ledger`` in one ``redeem_many`` batch (one transaction on a
    chain); if the ledger refuses the batch, each voucher alone, so one refused voucher does
    not stop the others."""
    results: list[Redemption | None] = []
    readable: list[tuple[int, Voucher, bytes]] = []
    for data in vouchers:
        try:
            voucher, _ = decode_voucher(data)
        except InvalidVoucher as error:
            results.append(Redemption("?", 0, 0, 0, str(error)))
            continue
        readable.append((len(results), voucher, data))
        results.append(None)
    try:
        batch: list[int | str] = list(ledger.redeem_many([data for _, _, data in readable]))
    except LayerchainError:
        batch = []
        for _, _, data in readable:
            try:
                batch.append(ledger.redeem(data))
            except LayerchainError as error:
                batch.append(str(error))
    for (index, voucher, _), outcome in zip(readable, batch):
        credited, problem = (outcome, None) if isinstance(outcome, int) else (0, outcome)
        results[index] = Redemption(
            voucher.channel_id, voucher.nonce, voucher.cumulative_amount, credited, problem
        )
    return [r for r in results if r is not None]
