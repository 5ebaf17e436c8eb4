"""A node: serves one span of blocks to inference sessions and announces it in the DHT.

The node owns a ``SpanModel`` (layerchain.model), a listener on a ``Transport`` and a
``Discovery`` handle; it never imports the client. Each request is one wire message and
gets one reply; a ``LayerchainError`` raised while handling becomes an ``ErrorReply`` with
the error's code, so a bad request never stops the node.

Life cycle: ``start()`` measures ``ms_per_block``, listens, and starts announcing;
``stop()`` withdraws the records, refuses new sessions, lets open sessions drain for up to
``drain_s`` seconds, then closes everything.

Every step result carries a signed receipt; a priced node with a ledger serves a step only
when its voucher pays for it (``node.payments``, ``NodePayments``).

Bounded work per request: a step carries at most ``MAX_STEP_TOKENS`` tokens (more is
``limit_exceeded``, refused from the frame header by the codec); a step expected to compute
longer than ``COMPUTE_SLICE_S`` runs block by block, handing the event loop over between
blocks, so pings and other sessions' steps are answered during a long prefill. What one
client may reserve is bounded by ``SessionTable``'s admission rules, per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from layerchain import __version__
from layerchain.discovery import AnnounceConfig, Announcer, Discovery, PeerRecord
from layerchain.discovery.addresses import announced_endpoints
from layerchain.discovery.records import MAX_MS_PER_BLOCK, MAX_RTT_MS, MAX_RTTS, MIN_MS_PER_BLOCK
from layerchain.errors import LimitExceeded, OfferChanged, PeerBusy, UnknownSession
from layerchain.market import Wallet, tokens_of
from layerchain.model.batched import batchable
from layerchain.model.device import reply_dtype
from layerchain.node.batching import BatchConfig, DecodeBatcher
from layerchain.node.config import NodeConfig
from layerchain.node.load import LOAD_ANNOUNCE_S, Announced, LoadMeter, worth_announcing
from layerchain.node.misbehave import Misbehavior, cheating_span
from layerchain.node.payments import NodePayments
from layerchain.node.push import PushService
from layerchain.node.reachability import DialBackProbes, DialBackService, relayed_endpoints
from layerchain.node import training
from layerchain.node.seeding import seeder_for
from layerchain.node.sessions import Session, SessionTable
from layerchain.types import Span
from layerchain.wire import messages as m
from layerchain.wire.compress import check_form, to_wire
from layerchain.wire.relay import RelayService
from layerchain.wire.rpc import serve_connection
from layerchain.wire.transport import Connection, Listener, Transport

log = logging.getLogger(__name__)

# All of a node's torch work (loading, measuring, every step) runs on its event loop thread.
# libgomp, the OpenMP runtime of torch's CPU builds, keeps a team of worker threads for each
# live thread that ran a parallel op; once those teams hold more threads than there are
# CPUs it stops spinning between parallel regions, and each of the hundreds of regions in a
# step pays a sleep and a wake-up. On 2 cores one more such thread (a worker that loaded
# the span) took a 30-block decode step from 30 ms to 53 ms. So a long step is not moved to
# a thread: it runs in slices of blocks on the loop, yielding between them.
COMPUTE_SLICE_S = 0.05  # seconds of compute a step may hold the event loop before it yields
YIELD_S = 0.001  # then the loop is free this long: a ping needs several loop turns (read,
# reply, the peer's read over memory), which a bare sleep(0) (one turn) would not give it


def measure_ms_per_block(span: Any, hidden_size: int, steps: int = 24) -> float:
    """Fastest of ``steps`` single-token decode steps through ``span``, per block, in ms.

    The minimum, not the median: nodes often start side by side on shared cores, and the
    least disturbed sample is the best estimate of the cost once they take turns."""
    return _per_block(span, list(_timed_steps(span, hidden_size, steps)))


async def measure_between_steps(span: Any, hidden_size: int, steps: int = 24) -> float:
    """``measure_ms_per_block`` on a serving node's event loop: handed over between steps,
    so pings and sessions wait at most one decode step through ``span``."""
    times = []
    for seconds in _timed_steps(span, hidden_size, steps):
        times.append(seconds)
        await asyncio.sleep(YIELD_S)
    return _per_block(span, times)


def _timed_steps(span: Any, hidden_size: int, steps: int) -> Iterator[float]:
    """Seconds of each of ``steps + 2`` single-token decode steps (the first two warm up)."""
    cache = span.new_cache()
    x = torch.zeros(1, 1, hidden_size)
    for _ in range(steps + 2):
        with torch.inference_mode():  # entered per step: never held across a yield
            t0 = time.perf_counter()
            span.forward(x, cache).to("cpu")  # a GPU's step ends when its output is back
            seconds = time.perf_counter() - t0
        yield seconds


def _per_block(span: Any, times: list[float]) -> float:
    return 1000.0 * min(times[2:]) / max(1, span.end - span.start)


class Node:
    """Serves blocks ``[config.start, config.end)`` of one model."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        spec: Any,
        span: Any,
        transport: Transport,
        listen_at: str,
        discovery: Discovery,
        identity: Any,
        wallet: Wallet | None = None,
        ledger: Any = None,
        ms_per_block: float = 0.0,  # measured beforehand; 0: ``start()`` measures it
        announce_hosts: tuple[str, ...] = (),  # hosts others dial (discovery.addresses
        # .announce_hosts), best first; (): the listener's own host
    ) -> None:
        self.config = config
        self.spec = spec
        # testing defences only (node.misbehave): a cheat's span and what it returns
        self.misbehavior = Misbehavior(config.misbehave) if config.misbehave else None
        self.span = cheating_span(config.misbehave, span) if config.misbehave else span
        self.transport = transport
        self.listen_at = listen_at  # endpoint to listen on: "tcp://HOST:PORT" or "mem://NAME"
        self.announce_hosts = announce_hosts
        self.discovery = discovery
        self.identity = identity
        self.payments = NodePayments(
            wallet or Wallet.generate(),
            model_id=spec.model_id,
            price_per_block=config.price_per_block,
            ledger=ledger,
            data_dir=config.data_dir if ledger is not None else None,
            stake=config.stake,
            blocks=span.end - span.start,
            redeem_interval_s=config.redeem_interval_s,
            # a record of a price left may be read until one TTL after the change, and a
            # client plans with what it read for its own refresh period (10 s) or a failover
            price_grace_s=2 * config.record_ttl_s,
        )
        self.sessions = SessionTable(
            config.max_cache_tokens,
            config.max_sessions,
            config.session_idle_timeout_s,
            max_session_tokens=config.session_tokens,
            max_owner_tokens=config.connection_tokens,
            first_step_timeout_s=config.first_step_timeout_s,
        )
        self.ms_per_block = ms_per_block
        # steps in flight and recent step time, announced in the record (issue 16.2)
        self.load = LoadMeter(span.end - span.start, time.monotonic())
        # concurrent sessions' decode steps, one forward
        self.batcher = DecodeBatcher(BatchConfig(window_ms=config.batch_window_ms))
        self._load_announced: Announced | None = None  # the load last put in a record
        self._announcing = False  # a load-triggered announcement is under way
        self.listener: Listener | None = None
        self.announcer: Announcer | None = None
        self.draining = False
        self.rtts: dict[str, float] = {}  # peer id -> round trip, ms, to the next hops it
        # forwarded to in push mode (``observe_rtt``), announced in the record
        self.push = PushService(self)  # push mode: forwarded inputs, links to next hops
        self._tasks: set[asyncio.Task] = set()
        self._connections = itertools.count(1)  # owner ids of served connections
        self._sweeper: asyncio.Task | None = None
        self._redeemer: asyncio.Task | None = None
        self.probes = DialBackProbes()  # nonces of this node's own reachability check
        self.dial_backs = DialBackService(transport)  # dialling others back for theirs
        self.relay_service: RelayService | None = None  # relaying for others (--relay)
        self.relay_listener: Listener | None = None  # registered with a relay (behind NAT):
        # its relay:// endpoint is announced first
        self.placement = ""  # why it serves this span, when it picked it (node.rebalance)
        self.moved_from: tuple[Span, float] | None = None  # the span left by the last move,
        # and when (monotonic s): a session asked there within the price grace (clients'
        # records lag) is told the offer changed, not that it broke a limit (no ban)
        self.drained: dict[str, float] = {}  # session id -> when a move closed it (monotonic
        # s; node.rebalance.drain): its next step is told so, not "unknown session" (no ban)
        # the model's files, for peers fetching them (node.seeding); None: --no-seed
        self.seeder = seeder_for(config, spec, Span(span.start, span.end))

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def wallet(self) -> str:
        """The address receipts are signed with and payments go to."""
        return self.payments.wallet.address

    @property
    def endpoint(self) -> str:
        """The endpoint the listener is bound to (maybe the wildcard 0.0.0.0)."""
        assert self.listener is not None, "node not started"
        return self.listener.endpoint

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints announced: ``announce_hosts`` on the listener's scheme and port
        (or ``config.announce_port``), best first."""
        direct = announced_endpoints(self.endpoint, self.announce_hosts, self.config.announce_port)
        if self.relay_listener is not None:
            return relayed_endpoints(self.relay_listener.endpoint, direct)
        return direct

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """``listen``, then ``announce`` (the runner checks reachability in between)."""
        await self.listen()
        await self.announce()

    async def listen(self) -> None:
        """Get ready to serve and accept connections; nobody knows of the node yet."""
        if not self.ms_per_block:
            self.ms_per_block = measure_ms_per_block(self.span, self.spec.hidden_size)
        await self.payments.redeem_left_over()
        await self.payments.register()
        self.listener = await self.transport.listen(self.listen_at, self._serve)

    async def serve_via(self, relay: str) -> None:
        """Also serve through the relay service at ``relay`` (``HOST:PORT``): registered
        there, the node's ``relay://`` endpoint is announced first (``endpoints``)."""
        self.relay_listener = await self.transport.listen(
            f"relay://{relay}/{self.peer_id}", self._serve
        )

    async def announce(self) -> None:
        """Announce the records and run the node's periodic tasks (``start``'s second half)."""
        self.announcer = Announcer(
            self.discovery,
            self.record,
            AnnounceConfig(refresh_s=self.config.refresh_s, ttl_s=self.config.record_ttl_s),
        )
        await self.announcer.start()
        self._sweeper = asyncio.create_task(self._sweep_idle())
        self._spawn(self.push.measure_every(self.config.refresh_s))  # RTTs to next hops
        if self.payments.book is not None:
            self._redeemer = asyncio.create_task(
                self.payments.redeem_every(self.config.redeem_interval_s)
            )
        log.info("node %s serving %s:%s at %s", self.peer_id, self.span.start, self.span.end,
                 self.endpoint)

    def record(self) -> PeerRecord:
        """The record announced for this node now."""
        now = time.monotonic()
        load = self.load.load(now, len(self.sessions))
        self._load_announced = Announced(load, now)
        return PeerRecord(
            peer_id=self.identity.peer_id,
            public_key=self.identity.public_key,
            endpoints=self.endpoints,
            model_id=self.spec.model_id,
            start=self.span.start,
            end=self.span.end,
            # within what DHT nodes accept, or the record would be refused and the node vanish
            ms_per_block=min(max(self.announced_ms_per_block, MIN_MS_PER_BLOCK), MAX_MS_PER_BLOCK),
            price_per_block=self.payments.price,  # adaptive pricing moves it (set_price)
            free_cache_tokens=0 if self.draining else self.sessions.admissible_tokens,
            wallet=self.wallet,
            rtts=tuple(sorted(self.rtts.items())),
            version=__version__,
            expires_at=0.0,
            relay=self.relay_service is not None,
            load=load,
        )

    @property
    def announced_ms_per_block(self) -> float:
        """The compute cost announced, ms per block per token: the measured one, or the
        ``emulate_ms_per_block`` testing aid's if slower."""
        return max(self.ms_per_block, self.config.emulate_ms_per_block)

    def set_price(self, price: int) -> None:
        """Charge ``price`` credits per block per token for sessions opened from now on (open
        ones keep the price their receipts started with; clients still planning with the old
        one get it for two record TTLs: ``NodePayments.open``); announced at the next record."""
        self.payments.retune(price=price, blocks=self.span.end - self.span.start)

    def swap_span(self, span: Any, ms_per_block: float) -> Any:
        """Serve ``span`` (a loaded SpanModel) from now on: new sessions open on it, sessions
        already open keep computing on theirs (``Session.span``) until they close. Returns
        the span served before; the caller announces, drains and frees it (node.rebalance).
        The seeder offers the new span's files from now on (a fetch of the old one's goes
        to other seeders)."""
        old = self.span
        self.moved_from = (Span(old.start, old.end), time.monotonic())
        self.span = cheating_span(self.config.misbehave, span) if self.config.misbehave else span
        self.ms_per_block = ms_per_block
        self.load = LoadMeter(span.end - span.start, time.monotonic())
        self.payments.retune(price=self.payments.price, blocks=span.end - span.start)
        if self.seeder is not None:
            self.seeder.follow(Span(span.start, span.end))
        return old

    def _announce_load(self) -> None:
        """Re-announce now if the load moved enough since the last record (rate-limited,
        ``node.load.worth_announcing``), so clients planning a moment later see it."""
        if self.announcer is None or self._announcing or self.draining:
            return
        now = time.monotonic()
        last = self._load_announced
        if last is not None and now - last.at < LOAD_ANNOUNCE_S:
            return  # the common case on the step path: nothing built, nothing compared
        if not worth_announcing(self._load_announced, self.load.load(now, len(self.sessions)),
                                now):
            return
        self._announcing = True

        async def announce(announcer: Announcer) -> None:
            try:
                await announcer.announce_now()
            except Exception as error:  # the periodic refresh tries again
                log.info("announcing the load failed: %s", error)
            finally:
                self._announcing = False

        self._spawn(announce(self.announcer))

    async def stop(self, drain_s: float = 5.0) -> None:
        """Withdraw from the DHT, let sessions finish for up to ``drain_s``, then close."""
        self.draining = True
        if self.announcer is not None:
            with contextlib.suppress(Exception):
                await self.announcer.stop()
        deadline = time.monotonic() + drain_s
        while len(self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.listener is not None:
            await self.listener.close()
        for other in (self.relay_listener, self.relay_service):
            if other is not None:
                await other.close()
        for task in list(self._tasks):
            task.cancel()
        await self.push.close()
        self.sessions.close_all()
        if self._redeemer is not None:
            self._redeemer.cancel()
        await self.payments.redeem()
        await self.payments.claim_uptime()

    async def _sweep_idle(self) -> None:
        config = self.config
        period = min(5.0, config.session_idle_timeout_s / 2, config.first_step_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            expired = self.sessions.expire_idle()
            for sid in expired:
                log.info("closed idle session %s", sid)
            self._announce_load()  # a node going idle shows it before the next refresh
            if expired and self.announcer is not None:  # announce the freed room now, not
                with contextlib.suppress(Exception):   # at the next refresh: clients skip a
                    await self.announcer.announce_now()  # peer whose record says it is full

    # ---------------------------------------------------------------- requests

    async def _serve(self, conn: Connection) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        owner = next(self._connections)  # what this connection's sessions reserve is bounded

        async def handle(msg: m.Message) -> m.Message | None:
            if isinstance(msg, m.DialBack):  # only to where the request came from
                return await self.dial_backs.dial_back(msg, observed=conn.peer)
            return await self.handle(msg, owner)

        try:
            stats = await serve_connection(
                conn, handle, reply_delay_s=self.config.emulate_latency_ms / 1000.0
            )
            for session_id in stats.open_sessions:  # the client is gone: free its caches
                self.sessions.close(session_id, owner)
        finally:
            if self.seeder is not None:
                self.seeder.forget(owner)
            if task is not None:
                self._tasks.discard(task)

    async def handle(self, msg: Any, owner: int = 0) -> Any:
        """Answer one request of connection ``owner``; raise a LayerchainError for an error
        reply."""
        if isinstance(msg, m.Step):
            self.push.supersede(msg.session_id, msg.step)  # the client fell back to pull
            return await self.run_step(msg, owner)
        if isinstance(msg, (m.PushStep, m.Forward)):  # push mode (node.push)
            return await self.push.handle(msg, owner)
        if isinstance(msg, m.OpenSession):
            opened = self._open(msg, owner)
            self._announce_load()
            return opened
        if isinstance(msg, m.CloseSession):
            self.sessions.close(msg.session_id, owner)
            self._announce_load()
            if self.payments.book is not None:  # when worth it (gas on a chain)
                self._spawn(self.payments.redeem(force=False))
            return m.SessionClosed(rid=msg.rid, session_id=msg.session_id)
        if isinstance(msg, m.Ping):
            return m.Pong(rid=msg.rid, nonce=msg.nonce)
        if isinstance(msg, m.Info):
            return self._info(msg.rid)
        if isinstance(msg, m.DialBackProbe):  # another peer reached us for our check
            self.probes.arrived(msg.nonce)
            return m.Pong(rid=msg.rid, nonce=msg.nonce)
        if isinstance(msg, m.DialBack):
            return await self.dial_backs.dial_back(msg)
        if isinstance(msg, m.RelayQuery):
            return m.RelayOffer(msg.rid, self.relay_service.port if self.relay_service else 0)
        if isinstance(msg, (m.TrainForward, m.TrainBackward)):  # fine-tuning through the swarm
            return await training.handle(self, msg, owner)
        if isinstance(msg, (m.ManifestQuery, m.PieceQuery)) and self.seeder is not None:
            return await self.seeder.answer(msg, owner, time.monotonic())  # node.seeding
        raise LimitExceeded(f"a node does not accept {type(msg).__name__} requests")

    async def run_step(self, msg: m.Step, owner: int = 0) -> m.StepResult:
        """``_step``, counted in the node's load (a Step, or a PushStep's input arrived)."""
        self.load.begin(time.monotonic())
        try:
            return await self._step(msg, owner)
        finally:
            self.load.end(time.monotonic())
            self._announce_load()

    def observe_rtt(self, peer_id: str, ms: float) -> None:
        """A round trip to ``peer_id`` measured (ms), smoothed; announced in the record
        (at most ``MAX_RTTS`` peers: the oldest entry leaves first)."""
        old = self.rtts.pop(peer_id, None)
        ms = min(ms, MAX_RTT_MS)
        self.rtts[peer_id] = round(ms if old is None else 0.7 * old + 0.3 * ms, 3)
        while len(self.rtts) > MAX_RTTS:
            del self.rtts[next(iter(self.rtts))]

    def _info(self, rid: int) -> m.InfoReply:
        return m.InfoReply(
            rid=rid,
            peer_id=self.peer_id,
            model_id=self.spec.model_id,
            start=self.span.start,
            end=self.span.end,
            ms_per_block=self.ms_per_block,
            price_per_block=self.payments.price,
            free_cache_tokens=self.sessions.admissible_tokens,
            wallet=self.wallet,
            version=__version__,
            rtts=dict(self.rtts),
        )

    def _open(self, msg: m.OpenSession, owner: int) -> m.SessionOpened:
        if self.draining:
            raise PeerBusy("node is shutting down")
        if msg.model_id != self.spec.model_id:
            raise LimitExceeded(
                f"node serves model {self.spec.model_id[:12]}, not {msg.model_id[:12]}"
            )
        if not self.span.start <= msg.start < msg.end <= self.span.end:
            left = self.moved_from
            if left is not None and left[0].start <= msg.start < msg.end <= left[0].end \
                    and time.monotonic() - left[1] <= self.payments.price_grace_s:
                raise OfferChanged(
                    f"node moved to blocks {self.span.start}:{self.span.end}, from "
                    f"{left[0]}", hint="re-read its record and plan again")
            raise LimitExceeded(
                f"node serves blocks {self.span.start}:{self.span.end}, "
                f"not {msg.start}:{msg.end}"
            )
        check_form(msg.wire)  # an unknown wire form: limit_exceeded, before any cache
        cache = self.span.new_cache(msg.start, msg.end, max_length=msg.max_length)
        session = self.sessions.open(
            msg.session_id, msg.max_length, cache, msg.start, msg.end, owner
        )
        session.span = self.span  # its cache's span, even after the node moves (swap_span)
        session.wire = msg.wire  # its steps' replies travel in that form (wire.compress)
        try:  # admitted first, so a busy node takes no reservation fee
            session.payment = self.payments.open(
                msg.session_id, msg.start, msg.end, max_length=msg.max_length, voucher=msg.voucher,
                price=msg.price_per_block,  # OfferChanged if no longer charged
            )
        except BaseException:
            self.sessions.close(msg.session_id)
            raise
        return m.SessionOpened(
            rid=msg.rid, session_id=msg.session_id, free_cache_tokens=self.sessions.admissible_tokens
        )

    async def _step(self, msg: m.Step, owner: int = 0) -> m.StepResult:
        hidden = msg.hidden
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.spec.hidden_size:
            raise LimitExceeded(
                f"hidden states must be [1, T, {self.spec.hidden_size}], got {list(hidden.shape)}"
            )
        tokens = tokens_of(hidden)
        if tokens > m.MAX_STEP_TOKENS:  # the codec's limit, unless a transport raised it
            raise LimitExceeded(
                f"a step carries at most {m.MAX_STEP_TOKENS} tokens, this one {tokens}",
                hint="split it into several steps",
            )
        try:
            session = self.sessions.get(msg.session_id, owner)
        except UnknownSession:
            if msg.session_id in self.drained:
                raise OfferChanged(
                    f"node moved to blocks {self.span.start}:{self.span.end} and closed "
                    f"session {msg.session_id}", hint="re-read its record and plan again"
                ) from None
            raise
        # Before the first await: vouchers are checked in the order they arrived.
        self.payments.charge(session.payment, msg.voucher, tokens)
        async with session.lock:
            if msg.step != session.next_step:
                raise LimitExceeded(
                    f"session {msg.session_id} expects step {session.next_step}, got {msg.step}"
                )
            if session.tokens + tokens > session.max_length:
                raise LimitExceeded(
                    f"session {msg.session_id} would hold {session.tokens + tokens} tokens, "
                    f"more than its max_length {session.max_length}"
                )
            x = hidden  # the span moves it to its device and compute dtype (one copy)
            # the output goes back to CPU memory for the wire, in the dtype the client sent
            # (fp16, bf16) from a float32 span, else in the span's (model.device.reply_dtype);
            # no copy on a CPU. On a GPU that copy waits for the step: it is timed with it
            computing = time.perf_counter()  # reported in the result (compute_ms)
            span = session.span  # the node's span, or the one it moved from (swap_span)
            wire = reply_dtype(hidden.dtype, span.compute_dtype)
            blocks = session.end - session.start
            short = tokens * blocks * self.ms_per_block < 1000.0 * COMPUTE_SLICE_S
            batched = False
            if tokens == 1 and session.cache is not None and batchable(span, session.cache) \
                    and (short or self.batcher.batching(session)):
                # a decode step: batched with other sessions' (node.batching; alone, it
                # runs span.forward as below, at once when no other session is expected).
                # A slow span's step (a loaded machine: its fastest step measured long)
                # still batches when others are expected: else it runs in slices alone
                decoded = await self.batcher.step(session, x)
                batched = True
                out = decoded.hidden.to(dtype=wire)
                per_block = 1000.0 * decoded.seconds / blocks
                if decoded.batch == 1:  # the fastest cost seen alone, as at start
                    self.ms_per_block = min(self.ms_per_block, per_block)
                self.load.sample(per_block / decoded.batch)  # a batch's steps share its time
            elif short:
                t0 = time.perf_counter()
                with torch.inference_mode():  # on this thread: see the note at the top
                    out = span.forward(x, session.cache, start=session.start, end=session.end)
                    out = out.to(device="cpu", dtype=wire)
                if tokens == 1:  # a decode step: keep the fastest cost seen, as at start
                    per_block = 1000.0 * (time.perf_counter() - t0) / blocks
                    self.ms_per_block = min(self.ms_per_block, per_block)
                    self.load.sample(per_block)
            else:
                out = await self._forward_in_slices(x, session)
                out = out.to(device="cpu", dtype=wire)
            if not batched and session.cache is not None and batchable(span, session.cache):
                self.batcher.expect(session)  # a prompt (or a step alone): decode steps follow
            if self.misbehavior is not None:
                out = self.misbehavior.output(msg.session_id, out)
            out = to_wire(out, session.wire)  # as the client decodes it: what is committed
            session.stepped(tokens)
            # the receipt commits to ``out`` as returned (market.commitment), cheat or not
            receipt = self.payments.receipt(session.payment, msg.step, tokens, hidden, out)
            compute_ms = 1000.0 * (time.perf_counter() - computing)
        return m.StepResult(
            rid=msg.rid, session_id=msg.session_id, step=msg.step, hidden=out, receipt=receipt,
            compute_ms=round(compute_ms, 3),
        )

    async def _forward_in_slices(self, x: torch.Tensor, session: Session) -> torch.Tensor:
        """The session's blocks over ``x`` [1, T, H] float32, handing the event loop over
        whenever ``COMPUTE_SLICE_S`` of compute has run (between blocks: one block is the
        unit of work), so a long prefill never keeps pings and other sessions waiting for
        more than a slice and a block. Stops with UnknownSession if the session is closed
        meanwhile (its client is gone: the rest of the work would be wasted)."""
        out = x
        slice_start = time.perf_counter()
        for out in session.span.forward_stepwise(x, session.cache):
            if time.perf_counter() - slice_start >= COMPUTE_SLICE_S:
                await asyncio.sleep(YIELD_S)
                if session.cache is None:
                    raise UnknownSession(f"session {session.session_id} closed during its step")
                slice_start = time.perf_counter()
        return out

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
