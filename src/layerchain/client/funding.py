"""The client's purse: payment channels sized to the requests they pay for.

A ``ChannelPayer`` signs the vouchers; ``Funding`` decides how much each channel locks.
With a fixed deposit (``ChannelPayer(deposit=N)``, ``--deposit N``) every channel holds N,
as before. Without one, a channel is opened when a session needs it, holding ``margin``
times the most that session can pay the peer (``price x blocks x max_length``), so a peer
that fails at its first step locks one request's worth, not the client's balance. A
channel too small for the next session is replaced by a new one when no open session
holds credits on it; the replaced channel is kept (``retired``) and settled with the rest.

A session is bound to the channel of its first voucher (nodes refuse a switch), so the
channel is chosen at ``reserve`` time, before the session's first step.

Pay for verified work (``layerchain.market.credit``): ``owe`` records work asked of a node
and returns the voucher to send with it, paying the least the node accepts: what audits
have ``clear``-ed, and enough of the rest to stay within the node's credit. Work an audit
found wrong is taken off (``dispute``) and never paid. ``flush`` pays what was cleared
after the last step (the final audit window) by redeeming the voucher on the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from layerchain.errors import InsufficientFunds
from layerchain.ledger.base import Channel
from layerchain.ledger.signatures import address_bytes
from layerchain.market import ChannelPayer
from layerchain.market.credit import least_payment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retired:
    """A channel replaced by a larger one, with what was promised on it (credits)."""

    channel: Channel
    promised: int


class Funding:
    """Sized channels over one ``ChannelPayer`` (see the module docstring)."""

    def __init__(self, payer: ChannelPayer, margin: float = 2.0) -> None:
        self.payer, self.margin = payer, margin
        self.retired: list[Retired] = []
        self._held: dict[bytes, int] = {}  # address -> credits open sessions may still pay
        # on the current channel to each address, credits: work asked (disputed taken off),
        # work cleared by audits (or not to be audited), and paid by vouchers
        self._owed: dict[bytes, int] = {}
        self._cleared: dict[bytes, int] = {}
        self._paid: dict[bytes, int] = {}

    def reserve(self, address: str, credits: int) -> None:
        """Make the channel to ``address`` able to pay ``credits`` more for a new session.

        Opens (or replaces) a channel when needed: on the ledger, so InsufficientFunds when
        the wallet cannot lock the deposit. ``release`` gives back what a session did not pay."""
        key = address_bytes(address)
        if self.payer.deposit <= 0 and credits > 0:  # sized channels
            held = self._held.get(key, 0)
            current = self._current(address)
            free = -1 if current is None else current.deposit - self.payer.spent(address) - held
            if free < credits and held == 0:
                if current is not None:
                    self.retired.append(Retired(current, self.payer.spent(address)))
                # the new channel's tally starts at what the old one left unpaid
                paid = self._paid.pop(key, 0)
                self._owed[key] = max(0, self._owed.get(key, 0) - paid)
                self._cleared[key] = max(0, self._cleared.get(key, 0) - paid)
                deposit = max(credits, math.ceil(credits * self.margin))
                self.payer.open(address, deposit)
                log.info("opened a channel of %d credits to %s", deposit, address)
        elif credits > 0:  # a fixed deposit: it must hold what the session may cost
            channel = self.payer.channel(address)  # opened now with the fixed deposit
            free = channel.deposit - self.payer.spent(address)
            if free < credits:  # found here, not as a priced node's refusal that bans it
                raise InsufficientFunds(
                    f"channel to {address} holds {channel.deposit} credits ({free} unspent), "
                    f"a session may cost {credits}",
                    hint="raise --deposit, or leave it out to size channels per request",
                )
        self._held[key] = self._held.get(key, 0) + credits

    def pay(self, address: str, amount: int) -> bytes:
        """The cumulative voucher paying ``amount`` more to ``address``."""
        voucher = self.payer.voucher_for(address, amount)
        key = address_bytes(address)
        self._held[key] = max(0, self._held.get(key, 0) - amount)
        return voucher

    def owe(self, address: str, amount: int, credit: int) -> tuple[bytes, int]:
        """Record ``amount`` credits of work asked of ``address``; return the voucher to send
        with it and the credits it pays now: everything cleared, and at least what keeps the
        unpaid rest within ``credit`` (the node's ``credit_amount``; 0: pay in advance)."""
        key = address_bytes(address)
        self._owed[key] = owed = self._owed.get(key, 0) + amount
        paid = self._paid.get(key, 0)
        due = max(0, least_payment(owed, self._cleared.get(key, 0), credit) - paid)
        self._paid[key] = paid + due
        return self.pay(address, due), due

    def clear(self, address: str, amount: int) -> None:
        """``amount`` credits of work asked of ``address`` were verified (or need no audit):
        the next voucher to it (or ``flush``) pays them."""
        key = address_bytes(address)
        self._cleared[key] = self._cleared.get(key, 0) + amount

    def dispute(self, address: str, amount: int) -> None:
        """``amount`` credits of work asked of ``address`` were found wrong: never paid."""
        key = address_bytes(address)
        self._owed[key] = max(0, self._owed.get(key, 0) - amount)

    def unpaid_cleared(self, address: str) -> int:
        """Credits cleared for ``address`` and not paid yet."""
        key = address_bytes(address)
        return max(0, self._cleared.get(key, 0) - self._paid.get(key, 0))

    async def flush(self, address: str) -> int:
        """Pay ``address`` what was cleared and not paid (the last audit window of a
        generation, after its last step): the voucher is redeemed on the ledger at once,
        crediting the node. Returns the credits paid."""
        due = self.unpaid_cleared(address)
        ledger = self.payer.ledger
        if due <= 0 or ledger is None:
            return 0
        key = address_bytes(address)
        self._paid[key] = self._paid.get(key, 0) + due
        voucher = self.pay(address, due)
        try:
            await asyncio.to_thread(ledger.redeem, voucher)
        except Exception as error:  # noqa: BLE001 - the node can still redeem it later
            log.warning("could not redeem the last voucher to %s: %s", address, error)
        return due

    def release(self, address: str, credits: int) -> None:
        """A session ended with ``credits`` of its reservation unpaid."""
        key = address_bytes(address)
        self._held[key] = max(0, self._held.get(key, 0) - credits)

    def _current(self, address: str) -> Channel | None:
        key = address_bytes(address)
        for channel in self.payer.channels():
            if address_bytes(channel.payee) == key:
                return channel
        return None

    async def settle(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for each node to redeem what it was promised, then ask the
        ledger to close every channel (the rest of the deposit returns after the dispute
        window). Waiting matters on a ledger without a dispute window, where a close refunds
        at once and a voucher redeemed after it is refused."""
        ledger = self.payer.ledger
        assert ledger is not None
        promised = {c.channel_id: self.payer.spent(c.payee) for c in self.payer.channels()}
        promised.update({r.channel.channel_id: r.promised for r in self.retired})
        deadline = time.monotonic() + wait_s
        while promised and time.monotonic() < deadline:
            states = await asyncio.to_thread(lambda: [ledger.channel(c) for c in promised])
            if all(state.redeemed >= promised[state.channel_id] for state in states):
                break
            await asyncio.sleep(0.1)
        for channel_id in promised:
            try:
                await asyncio.to_thread(self.payer.close, channel_id)  # signed by the payer
            except Exception as error:  # noqa: BLE001 - a refused close must not lose the others
                log.warning("could not close channel %s: %s", channel_id[:10], error)
