"""A node's side of the market: a receipt for every step, vouchers before serving, redemption.

Every step result carries a receipt signed with the node's wallet (``ReceiptSigner``, one
hash chain per session), priced or not: it is the node's proof of contribution. A node
with a price and a ledger is paid in advance:

* opening a session costs ``reservation_amount(max_length, blocks, price)``, paid by the
  ``OpenSession`` voucher, on a channel whose unspent deposit can also pay for the whole
  reservation (``max_length`` tokens on every block): holding a priced node's cache is
  never free;
* each ``Step`` carries a cumulative voucher on the same channel covering everything
  served on it, this step included, less the channel's credit; a missing or short voucher
  gets ``InsufficientFunds`` and the step is not run.

Pay for verified work (seed 002's escrow): the node serves on credit, so a client that
audits pays for a step only once an audit verified it and a node caught cheating is never
paid for the steps it lied on (``layerchain.market.credit``). The credit is bounded: at
most ``CREDIT_TOKENS`` tokens of this node's work (x blocks x price) per channel, so a
client that stops paying costs the node at most that much (and its session is refused as
soon as it lags more). A client that does not audit pays in advance, as before. The last window of a generation is paid once its
final audit is done: the client redeems that voucher on the ledger itself (anyone may
redeem a voucher; the payee is credited), the node's own redemption then finds it paid.

Without a ledger a priced node still signs what it is owed but serves on trust.

Price changes (adaptive pricing): a client opens a session at the price in the record it
planned with (``OpenSession.price_per_block``); clients re-read records every few seconds,
so theirs may be up to one record TTL old. The node charges that price when it is its
current one or one it charged within the last ``price_grace_s`` (twice its record TTL: a
record of the old price may be read until a TTL after the change, then planned with for the
client's refresh period), else refuses with ``OfferChanged`` (the client re-reads its record:
no ban). The session's receipts, fee and credit all use the agreed price; a client saves at
most the price's drift over the grace, which the pricing policy bounds per round.

Several sessions of one client share its channel, so the amount owed is kept per channel.
Vouchers are checked in the order frames arrive (before the step waits for its session's
lock), which is the order the client signed them in over its one connection.

Closing: the node serves on a channel's ledger state at most a second old (plus one ledger
read, done in a worker thread: the event loop never waits on SQLite). Once its payer
asked to close it, nothing more is served and the node redeems at once; and a priced node refuses to start on a ledger whose dispute window
is not longer than its redemption interval, so even a channel closed between sessions is
redeemed before the payer's refund.

The latest voucher of each channel is written to ``DATA_DIR/vouchers`` behind the steps
(a worker thread, within ``SAVE_DELAY_S``) and redeemed on the ledger when a session
closes, every ``redeem_interval_s``, when a close request is seen, at start (what a
previous run left) and at stop, in a worker thread: the SQLite write never blocks the
event loop. After a round that changed the ledger, the node appends a
checkpoint of the journal head, signed with its wallet, to ``DATA_DIR/checkpoints.jsonl``.

Gas (an EVM ledger): every redemption is one ``redeem_many`` transaction for all channels
that owe something (a voucher already redeemed, by the client's final flush for one, is
left out: it would credit 0 and still cost gas). The rounds at session end and every
``redeem_interval_s`` run only when ``worth_redeeming``: the credits waiting are worth at
least ``REDEEM_GAS_MULTIPLE`` times the transaction's gas (``redemption_gas`` x the chain's
gas price, in credits); below that the vouchers wait (safe: they are cumulative, and a
client cannot take the deposit back before a close request is seen). A close request and
the node's stop always redeem, and every periodic round re-reads its channels' states, so
a channel closed between sessions is redeemed within the dispute window whatever it holds.
On SQLite a redemption is free and every round redeems, as before.

Uptime: a node started with a ``stake`` registers on the ledger (staking that much of its
balance, and the number of blocks it serves) and claims its reward every redemption
round; the ledger alone decides the amount from what it saw (``journal._claim_reward``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerchain.errors import (
    ChannelError,
    ConfigError,
    InsufficientFunds,
    InvalidVoucher,
    LayerchainError,
    LedgerError,
    OfferChanged,
)
from layerchain.ledger import CheckpointStore, Ledger
from layerchain.ledger.base import OPEN
from layerchain.market import (
    ReceiptSigner,
    VoucherBook,
    VoucherStore,
    Wallet,
    redeem_stored,
    reservation_amount,
    step_amount,
)
from layerchain.market.credit import credit_amount
from layerchain.market.commitment import commit
from layerchain.market.vouchers import decode_voucher
from layerchain.types import Span

log = logging.getLogger(__name__)

SAVE_DELAY_S = 0.2  # accepted vouchers reach the disk within this long (one batch per delay)
# Gas (EVM ledgers): a round of redemption runs once the credits it collects are worth this
# many times what its transaction costs; the transaction's gas is estimated as a base plus
# a share per voucher (measured on anvil with the committed contract: docs/BENCHMARKS.md).
REDEEM_GAS_MULTIPLE = 3
REDEEM_GAS_BASE = 46_000  # gas of a redeemMany transaction before its vouchers
REDEEM_GAS_PER_VOUCHER = 37_500  # gas each voucher adds (signature check, stores, event);
# measured: 1 voucher 83,494 gas, 2: 103,782, 4: 178,510, 8: 327,881 (the estimate is above)


def redemption_gas(vouchers: int) -> int:
    """Estimated gas of one ``redeem_many`` transaction carrying ``vouchers`` vouchers."""
    return REDEEM_GAS_BASE + REDEEM_GAS_PER_VOUCHER * vouchers if vouchers > 0 else 0


def worth_redeeming(due: int, cost: int, multiple: int = REDEEM_GAS_MULTIPLE) -> bool:
    """Whether collecting ``due`` credits is worth a transaction costing ``cost`` credits."""
    return due > 0 and due >= multiple * cost


def agreed_price(asked: int, current: int, retired: dict[int, float], now: float,
                 grace_s: float) -> int:
    """The price per block per token a session opened asking ``asked`` pays: ``current`` when
    it asks -1 (not said) or ``current``; ``asked`` when the node charged it until less than
    ``grace_s`` before ``now`` (``retired``: price -> when it stopped being current, both
    monotonic seconds); else OfferChanged."""
    if asked == -1 or asked == current:
        return current
    until = retired.get(asked)
    if asked >= 0 and until is not None and now - until <= grace_s:
        return asked
    raise OfferChanged(
        f"this node charges {current} credits per block per token, not {asked}",
        hint="re-read its record and plan again",
    )


@dataclass
class SessionPayment:
    """One session's receipt chain and, once it pays, its channel."""

    signer: ReceiptSigner
    channel_id: str = ""
    credit: int = 0  # credits its channel may owe this node (at the session's price)


class NodePayments:
    """Receipts, voucher checks and redemption for one node."""

    def __init__(
        self,
        wallet: Wallet,
        *,
        model_id: str,
        price_per_block: int,
        ledger: Ledger | None = None,  # None serves on trust
        data_dir: str | Path | None = None,
        stake: int = 0,  # credits to stake for uptime rewards (0: not registered)
        blocks: int = 0,  # blocks served, registered with the stake
        redeem_interval_s: float = 30.0,  # seconds between redemption rounds
        price_grace_s: float = 120.0,  # a price changed from is still charged this long (s):
        # how stale a client's record of the node may be (the node: twice its record TTL)
        clock: Callable[[], float] = time.monotonic,  # seconds, for the grace; tests replace it
    ) -> None:
        self.wallet, self.model_id, self.price = wallet, model_id, price_per_block
        self.price_grace_s, self.clock = price_grace_s, clock
        self.retired: dict[int, float] = {}  # price -> monotonic s it stopped being current
        self.credit = credit_amount(blocks, price_per_block)  # credits a channel may owe at most
        self.ledger = ledger
        self.stake, self.blocks = stake, blocks
        self.rewards = 0  # uptime rewards received since start
        self.store = VoucherStore.for_data_dir(data_dir) if data_dir is not None else None
        self.checkpoints = (
            CheckpointStore.for_data_dir(data_dir) if data_dir is not None else None
        )
        self.book = (  # saved behind, by _save_soon
            VoucherBook(wallet.address, ledger.channel, domain=ledger.domain_separator)
            if ledger is not None else None
        )
        if self.required:
            assert ledger is not None
            window = ledger.config.dispute_window_s
            if window <= redeem_interval_s:
                raise ConfigError(
                    f"the ledger's dispute window ({window:g} s) is not longer than this node's "
                    f"redemption interval ({redeem_interval_s:g} s): a client could close its "
                    "channel and take back what it owes before the node redeems",
                    hint="use a ledger with a longer --dispute-window",
                )
        self._owed: dict[str, int] = {}  # channel id -> credits served on it (with baseline)
        self._redeem_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._rechecking: set[str] = set()  # channels being re-read from the ledger
        self._unsaved: dict[str, bytes] = {}  # channel id -> latest voucher not on disk yet
        self._saving = False
        self._write_lock = threading.Lock()  # one thread writes voucher files at a time
        self.redeemed = 0  # credits this node redeemed since it started

    def retune(self, *, price: int, blocks: int) -> None:
        """Charge ``price`` per block per token on ``blocks`` blocks for sessions opened from
        now on (adaptive pricing, a moved span); open sessions keep their price. The price
        left is still charged for ``price_grace_s`` to sessions asking for it (``open``)."""
        now = self.clock()
        if price != self.price:
            self.retired[self.price] = now
            self.retired.pop(price, None)
        self.retired = {p: t for p, t in self.retired.items() if now - t <= self.price_grace_s}
        self.price, self.blocks = price, blocks
        self.credit = credit_amount(blocks, price)

    @property
    def required(self) -> bool:
        """Whether sessions and steps must carry vouchers."""
        return self.book is not None and self.price > 0

    def open(
        self, session_id: str, start: int, end: int, *, max_length: int = 0, voucher: bytes = b"",
        price: int = -1,
    ) -> SessionPayment:
        """A session's payment state at the price it asked (``agreed_price``: OfferChanged if
        the node no longer charges it; -1: the current one); on a priced node, first check
        ``voucher`` pays the reservation fee on a channel able to pay for the whole
        reservation (raise if not)."""
        price = agreed_price(price, self.price, self.retired, self.clock(), self.price_grace_s)
        payment = SessionPayment(
            ReceiptSigner(self.wallet, session_id, self.model_id, Span(start, end), price),
            # the client lags by the credit of the record it opened with: at this price
            credit=max(self.credit, credit_amount(self.blocks, price)),
        )
        if self.book is not None and price > 0:
            fee = reservation_amount(max_length, end - start, price)
            self._pay(payment, voucher, fee, reserve=step_amount(max_length, end - start, price),
                      what=f"opening a session of {max_length} tokens costs {fee} credits")
        return payment

    def charge(self, payment: SessionPayment, voucher: bytes, tokens: int) -> None:
        """Check that ``voucher`` pays for this step; raise before any work if not."""
        price = payment.signer.price_per_block  # the session's (its receipts carry it)
        if self.book is not None and price > 0:
            amount = step_amount(tokens, payment.signer.span.length, price)
            self._pay(payment, voucher, amount,
                      what=f"this node charges {price} per block per token")

    def _pay(
        self, payment: SessionPayment, voucher: bytes, amount: int, *, what: str, reserve: int = 0
    ) -> None:
        """Accept ``voucher`` as paying ``amount`` more on the session's channel, which must
        then still hold ``reserve`` unspent credits; nothing is recorded when it fails."""
        assert self.book is not None and self.ledger is not None
        if not voucher:
            raise InsufficientFunds(
                f"{what} and the request carries no voucher",
                hint="give the client a wallet and the node's ledger (--data-dir, --ledger)",
            )
        channel_id = decode_voucher(voucher)[0].channel_id
        if payment.channel_id and channel_id != payment.channel_id:
            raise InvalidVoucher(
                f"session pays through channel {payment.channel_id[:10]}..., "
                f"not {channel_id[:10]}..."
            )
        try:  # a closing channel raises; a state older than a second is re-read off the loop
            channel = self.book.channel(channel_id, reread=False)
        except ChannelError:
            if self.book.closing:
                self._redeem_soon()
            raise
        if self.book.stale(channel_id):
            self._recheck_soon(channel_id)
        if channel_id not in self._owed:  # first sight: what earlier runs were paid is settled
            self._owed[channel_id] = self.book.paid(channel_id) or channel.redeemed
        owed = self._owed[channel_id] + amount
        if channel.deposit - owed < reserve:
            raise InsufficientFunds(
                f"channel {channel_id[:10]}... has {channel.deposit - owed} credits left after "
                f"this, the session may cost {reserve}",
                hint="open the channel with a larger deposit",
            )
        try:
            # on credit (market.credit): vouchers may lag the work by ``credit`` credits
            self.book.accept(voucher, owed - payment.credit, reread=False)  # InvalidVoucher, InsufficientFunds
        finally:
            if self.store is not None and self.book.latest_for(channel_id) == voucher:
                self._unsaved[channel_id] = voucher  # accepted, even when behind
                self._save_soon()
        self._owed[channel_id] = owed
        payment.channel_id = channel_id

    def receipt(
        self, payment: SessionPayment, step: int, tokens: int, x: torch.Tensor, out: torch.Tensor
    ) -> bytes:
        """The signed receipt of ``step``: ``x`` [1, T, H] as received, ``out`` exactly as
        returned (after any dtype cast), its commitment (``market.commitment``) signed in."""
        return payment.signer.sign_step(step, tokens, x, out, commit(out))

    # ---------------------------------------------------------------- redemption

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a caller outside the node): the next round does it
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _save_soon(self) -> None:
        """Write the latest vouchers to ``DATA_DIR/vouchers`` in a worker thread, at most one
        batch per ``SAVE_DELAY_S``: a file rename per step on the event loop cost ~2 ms a
        token. A node that crashes loses at most that long of payments; redemption reads
        the vouchers in memory, so a clean stop loses nothing."""
        if self.store is None or self._saving:
            return
        self._saving = True
        self._spawn(self._save())

    async def _save(self) -> None:
        try:
            await asyncio.sleep(SAVE_DELAY_S)
            await self._flush()
        finally:
            self._saving = False
        if self._unsaved:
            self._save_soon()

    async def _flush(self) -> None:
        """Write the vouchers accepted since the last write (a worker thread, one at a time)."""
        store, batch, self._unsaved = self.store, list(self._unsaved.values()), {}
        if store is None or not batch:
            return

        def write() -> None:
            with self._write_lock:
                for data in batch:
                    store.save(data)

        try:
            await asyncio.to_thread(write)
        except OSError as error:
            log.warning("could not save vouchers: %s", error)

    def _redeem_soon(self) -> None:
        """Redeem in the background (a channel is closing): the refund must not come first."""
        self._spawn(self.redeem())

    def _recheck_soon(self, channel_id: str) -> None:
        """Re-read a channel's ledger state in a worker thread (the SQLite read may wait on a
        writer's lock: never on the event loop); the next voucher on it sees the result."""
        if channel_id in self._rechecking:
            return
        self._rechecking.add(channel_id)
        self._spawn(self._recheck(channel_id))

    async def _recheck(self, channel_id: str) -> None:
        assert self.book is not None and self.ledger is not None
        try:
            channel = self.book.update(await asyncio.to_thread(self.ledger.channel, channel_id))
            if channel.state != OPEN and self.book.paid(channel_id) > channel.redeemed:
                await self.redeem()  # a close request: redeem before the refund
        except LayerchainError as error:
            log.warning("could not re-read channel %s: %s", channel_id[:10], error)
        finally:
            self._rechecking.discard(channel_id)

    async def redeem(self, *, force: bool = True) -> int:
        """Redeem the latest vouchers on the ledger; credits gained (0 without a ledger).

        On an EVM ledger only the vouchers still owed anything are sent, and without
        ``force`` only when that is ``worth_redeeming`` (or a channel is closing)."""
        if self.book is None or self.ledger is None:
            return 0
        await self._flush()  # on disk first: a refused or failed redemption is retried later
        async with self._redeem_lock:
            vouchers = self.book.latest()
            if vouchers and self.ledger.backend == "evm":
                try:
                    vouchers, due, closing = await asyncio.to_thread(self._owed_vouchers, vouchers)
                    if vouchers and not (force or closing):
                        cost = await asyncio.to_thread(self._redeem_cost, len(vouchers))
                        if not worth_redeeming(due, cost):
                            log.info("%d credits owed on %d channel(s) wait: a redemption "
                                     "costs ~%d", due, len(vouchers), cost)
                            return 0
                except LayerchainError as error:
                    log.warning("could not read the channels to redeem: %s", error)
                    return 0
            if not vouchers:
                return 0
            try:
                results = await asyncio.to_thread(redeem_stored, self.ledger, vouchers)
            except LayerchainError as error:
                log.warning("redemption failed: %s", error)
                return 0
            self.book.closing.clear()
        credited = sum(r.credited for r in results)
        for r in results:
            if r.error:
                log.warning("voucher on channel %s refused: %s", r.channel_id[:10], r.error)
        self.redeemed += credited
        if credited:
            log.info("redeemed %d credits from %d channel(s)", credited, len(results))
            await self._checkpoint()
        return credited

    def _owed_vouchers(self, vouchers: list[bytes]) -> tuple[list[bytes], int, bool]:
        """The vouchers paying more than their channel's ``redeemed`` (each channel's state
        read now, and kept in the book), the credits they add up to, and whether one of
        those channels is closing. Blocking: run in a worker thread."""
        assert self.book is not None and self.ledger is not None
        owed, due, closing = [], 0, False
        for data in vouchers:
            voucher = decode_voucher(data)[0]
            channel = self.book.update(self.ledger.channel(voucher.channel_id))
            if voucher.cumulative_amount > channel.redeemed:
                owed.append(data)
                due += voucher.cumulative_amount - channel.redeemed
                closing = closing or channel.state != OPEN
        return owed, due, closing

    def _redeem_cost(self, vouchers: int) -> int:
        """Credits of gas one transaction redeeming ``vouchers`` vouchers costs now (0 on a
        ledger without gas). Blocking: run in a worker thread."""
        from layerchain.ledger.evm import EvmLedger

        ledger = self.ledger
        if not isinstance(ledger, EvmLedger):
            return 0
        wei = redemption_gas(vouchers) * ledger.gas_price()  # gas x wei per gas
        return -(-wei // int(ledger.credit_wei))  # credits, rounded up

    async def _checkpoint(self) -> None:
        """Keep a signed copy of the ledger's head outside the ledger file."""
        if self.ledger is None or self.checkpoints is None:
            return
        ledger, store = self.ledger, self.checkpoints
        try:
            await asyncio.to_thread(lambda: store.append(ledger.checkpoint(self.wallet)))
        except (LayerchainError, OSError) as error:
            log.warning("could not keep a ledger checkpoint: %s", error)

    # ---------------------------------------------------------------- uptime

    async def register(self) -> None:
        """Stake up to ``stake`` and register the blocks served (no-op without a stake)."""
        ledger = self.ledger
        if ledger is None or self.stake <= 0 or self.blocks <= 0:
            return

        def stake() -> None:
            try:
                node = ledger.node(self.wallet.address)
                staked, blocks = node.stake, node.blocks
            except LedgerError:  # not registered yet
                staked, blocks = 0, 0
            more = max(0, self.stake - staked)
            if more or blocks != self.blocks:
                ledger.register_node(self.wallet, more, self.blocks)

        await asyncio.to_thread(stake)
        log.info("staked %d credits on %d blocks", self.stake, self.blocks)

    async def claim_uptime(self) -> int:
        """Claim the uptime reward the ledger owes (0 when none is due)."""
        ledger = self.ledger
        if ledger is None or self.stake <= 0:
            return 0
        try:
            reward = await asyncio.to_thread(ledger.claim_reward, self.wallet)
        except LayerchainError as error:
            log.debug("no uptime reward: %s", error)
            return 0
        self.rewards += reward
        await self._checkpoint()
        return reward

    async def redeem_left_over(self) -> int:
        """Redeem what a previous run of this node stored but never redeemed."""
        if self.store is None or self.ledger is None:
            return 0
        results = await asyncio.to_thread(redeem_stored, self.ledger, self.store.latest())
        credited = sum(r.credited for r in results)
        self.redeemed += credited
        return credited

    async def redeem_every(self, interval_s: float) -> None:
        """Every ``interval_s``: redeem what is worth its gas (every channel's state re-read:
        a closing one is always redeemed), claim the uptime reward."""
        while True:
            await asyncio.sleep(interval_s)
            await self.redeem(force=False)
            await self.claim_uptime()
