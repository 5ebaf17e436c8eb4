"""A node's side of the market: a receipt for every step, vouchers before serving, redemption.

Every step result carries a receipt signed with the node's wallet (``ReceiptSigner``, one
hash chain per session), priced or not: it is the node's proof of contribution. A node
with a price and a ledger is paid in advance: each ``Step`` must carry a cumulative voucher
on a channel to this node covering everything served on that channel, this step
included; a missing or short voucher gets ``InsufficientFunds`` and the step is not run.
Without a ledger a priced node still signs what it is owed but serves on trust.

Several sessions of one client share its channel, so the amount owed is kept per channel.
Vouchers are checked in the order frames arrive (before the step waits for its session's
lock), which is the order the client signed them in over its one connection.

The latest voucher of each channel is kept in ``DATA_DIR/vouchers`` and redeemed on the
ledger when a session closes, every ``redeem_interval_s``, at start (what a previous run
left) and at stop, in a worker thread: the SQLite write never blocks the event loop.

Uptime: a node started with a ``stake`` registers on the ledger (staking that much of its
balance) and, every redemption round, claims the ledger's reward per block-hour for the
time since its last claim with a liveness record it signs: ``[period_start, period_end)``
in whole seconds, the blocks it serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.errors import InsufficientFunds, InvalidVoucher, LayerchainError
from layerchain.market import (
    ReceiptSigner,
    VoucherBook,
    VoucherStore,
    Wallet,
    redeem_stored,
    step_amount,
)
from layerchain.ledger import LivenessRecord, sign_liveness
from layerchain.market.vouchers import decode_voucher
from layerchain.types import Span

log = logging.getLogger(__name__)


@dataclass
class SessionPayment:
    """One session's receipt chain and, once it pays, its channel."""

    signer: ReceiptSigner
    channel_id: str = ""


class NodePayments:
    """Receipts, voucher checks and redemption for one node."""

    def __init__(
        self,
        wallet: Wallet,
        *,
        model_id: str,
        price_per_block: int,
        ledger: Any = None,  # a Ledger; None serves on trust
        data_dir: str | Path | None = None,
        stake: int = 0,  # credits to stake for uptime rewards (0: not registered)
        blocks: int = 0,  # blocks served, claimed in liveness records
    ) -> None:
        self.wallet, self.model_id, self.price = wallet, model_id, price_per_block
        self.ledger = ledger
        self.stake, self.blocks = stake, blocks
        self.rewards = 0  # uptime rewards received since start
        self._live_since = 0  # unix second the next liveness claim starts at (0: no claims)
        self.store = VoucherStore.for_data_dir(data_dir) if data_dir is not None else None
        self.book = (
            VoucherBook(wallet.address, ledger.channel, store=self.store)
            if ledger is not None else None
        )
        self._owed: dict[str, int] = {}  # channel id -> credits served on it (with baseline)
        self._redeem_lock = asyncio.Lock()
        self.redeemed = 0  # credits this node redeemed since it started

    @property
    def required(self) -> bool:
        """Whether steps must carry vouchers."""
        return self.book is not None and self.price > 0

    def open(self, session_id: str, start: int, end: int) -> SessionPayment:
        signer = ReceiptSigner(self.wallet, session_id, self.model_id, Span(start, end), self.price)
        return SessionPayment(signer)

    def charge(self, payment: SessionPayment, voucher: bytes, tokens: int) -> None:
        """Check that ``voucher`` pays for this step; raise before any work if not."""
        if not self.required:
            return
        assert self.book is not None and self.ledger is not None
        if not voucher:
            raise InsufficientFunds(
                f"this node charges {self.price} per block per token and the step carries no "
                "voucher",
                hint="give the client a wallet and the node's ledger (--data-dir, --ledger)",
            )
        channel_id = decode_voucher(voucher)[0].channel_id
        if payment.channel_id and channel_id != payment.channel_id:
            raise InvalidVoucher(
                f"session pays through channel {payment.channel_id[:10]}..., "
                f"not {channel_id[:10]}..."
            )
        if channel_id not in self._owed:  # first sight: what earlier runs were paid is settled
            self._owed[channel_id] = self.book.paid(channel_id) or self.ledger.channel(
                channel_id
            ).redeemed
        amount = step_amount(tokens, payment.signer.span.length, self.price)
        owed = self._owed[channel_id] + amount
        self.book.accept(voucher, owed)  # InvalidVoucher, ChannelError, InsufficientFunds
        self._owed[channel_id] = owed
        payment.channel_id = channel_id

    def receipt(self, payment: SessionPayment, step: int, tokens: int, x: Any, out: Any) -> bytes:
        return payment.signer.sign_step(step, tokens, x, out)

    # ---------------------------------------------------------------- redemption

    async def redeem(self) -> int:
        """Redeem the latest vouchers on the ledger; credits gained (0 without a ledger)."""
        if self.book is None or self.ledger is None:
            return 0
        async with self._redeem_lock:
            vouchers = self.book.latest()
            if not vouchers:
                return 0
            try:
                results = await asyncio.to_thread(redeem_stored, self.ledger, vouchers)
            except LayerchainError as error:
                log.warning("redemption failed: %s", error)
                return 0
        credited = sum(r.credited for r in results)
        for r in results:
            if r.error:
                log.warning("voucher on channel %s refused: %s", r.channel_id[:10], r.error)
        self.redeemed += credited
        if credited:
            log.info("redeemed %d credits from %d channel(s)", credited, len(results))
        return credited

    # ---------------------------------------------------------------- uptime

    async def register(self) -> None:
        """Stake up to ``stake`` on the ledger and start counting uptime from now."""
        if self.ledger is None or self.stake <= 0:
            return
        address = self.wallet.address

        def stake_and_start() -> int:
            from layerchain.errors import LedgerError

            try:
                node = self.ledger.node(address)
                staked, rewarded_until = node.stake, node.rewarded_until
            except LedgerError:  # not registered yet
                staked, rewarded_until = 0, 0
            if staked < self.stake:
                self.ledger.register_node(address, self.stake - staked)
            return max(int(time.time()), rewarded_until)

        self._live_since = await asyncio.to_thread(stake_and_start)
        log.info("staked %d credits; uptime counts from %d", self.stake, self._live_since)

    async def claim_uptime(self) -> int:
        """Claim the reward for the whole seconds served since the last claim."""
        if self.ledger is None or not self._live_since or self.blocks <= 0:
            return 0
        now = int(time.time())
        if now <= self._live_since:
            return 0
        record = sign_liveness(
            self.wallet, LivenessRecord(self.wallet.address, self._live_since, now, self.blocks)
        )
        try:
            reward = await asyncio.to_thread(self.ledger.reward_uptime, record)
        except LayerchainError as error:
            log.warning("uptime claim refused: %s", error)
            return 0
        self._live_since = now
        self.rewards += reward
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
        while True:
            await asyncio.sleep(interval_s)
            await self.redeem()
            await self.claim_uptime()
