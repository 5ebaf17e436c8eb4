"""The Python API: ``Swarm(initial_peers=...)`` generates text through a swarm of peers.

``AsyncSwarm`` is the asyncio core; ``Swarm`` is its thin synchronous wrapper, running the
core on an event loop in one background thread. The client holds the model's head
(embeddings, final norm, LM head) and tokenizer, so peers never see token ids or text; the
decode loop is the same as ``layerchain.model.generate_local``'s: embed, push through the
hops, logits of the last position, sample, check stop conditions.

Payments: with ``ledger=`` (a ledger file) the client pays priced peers through payment
channels from the wallet in ``data_dir`` (``ChannelPayer``: one channel per node, opened
with ``deposit`` credits on first use); ``close()`` waits briefly for the nodes to redeem
what they were paid, then asks the ledger to close the channels (the unspent deposit comes
back after the ledger's dispute window). Receipts are checked with or without a ledger.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import torch

from layerchain.client.config import ClientConfig, RouteLimits
from layerchain.client.peers import PeerView
from layerchain.client.session import HopPayment, InferenceSession, Recovery
from layerchain.client.state import SwarmState, swarm_state
from layerchain.discovery import Discovery
from layerchain.market import ChannelPayer
from layerchain.model import Decoder, SamplingParams, encode_prompt, load_head, load_tokenizer, resolve_model
from layerchain.model.generate import eos_token_ids
from layerchain.types import Hop
from layerchain.wire.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("~/.layerchain")  # the wallet's home, as the `wallet` commands use
DEFAULT_DEPOSIT = 100_000  # credits locked in each channel the client opens


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it completed (may be empty mid-character)."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only
    prompt_tokens: int
    route: tuple[Hop, ...]  # the route at the end (after any failover)
    tokens_per_s: float  # decode tokens per second, first token excluded
    ttft_s: float  # seconds from the request to the first token
    recoveries: tuple[Recovery, ...] = ()
    finish_reason: str = "length"  # "stop" (EOS or stop string), "length", or "cancelled"
    # (ended early: its consumer stopped, or a step failed; ``cost`` is what was spent)
    hop_ms_per_token: float = 0.0  # time spent in the hop chain per decode token, ms
    cost: int = 0  # credits paid to the peers (or owed, on a swarm the client does not pay)
    payments: tuple[HopPayment, ...] = ()  # per peer: tokens computed and credits


class AsyncSwarm:
    """A client of one model on one swarm."""

    def __init__(
        self,
        *,
        spec: Any,
        head: Any,
        tokenizer: Any,
        discovery: Discovery,
        transport: Transport,
        config: ClientConfig,
        payer: ChannelPayer | None = None,
    ) -> None:
        self.spec = spec
        self.payer = payer
        self.head = head
        self.tokenizer = tokenizer
        self.discovery = discovery
        self.transport = transport
        self.config = config
        self.peers = PeerView(discovery, transport, spec.model_id, spec.num_blocks, config)
        self.eos_token_ids = eos_token_ids(spec.config)
        self.last_route: tuple[Hop, ...] = ()

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        model: str = "smollm2",
        config: ClientConfig | None = None,
        discovery: Discovery | None = None,
        transport: Transport | None = None,
        data_dir: str | Path | None = None,
        ledger: str | Path | None = None,
        deposit: int = DEFAULT_DEPOSIT,
        **limits: Any,
    ) -> AsyncSwarm:
        """Join the swarm through ``initial_peers`` (DHT multiaddrs) and load the head;
        with ``ledger``, pay priced peers from the wallet in ``data_dir``."""
        config = replace(config or ClientConfig(), **limits)
        payer = open_payer(data_dir, ledger, deposit) if ledger is not None else None
        spec = await asyncio.to_thread(resolve_model, model)
        # on the loop thread, where the decode loop runs the head: a second live thread that
        # ran torch ops would slow every step (see layerchain.node.server on libgomp's teams)
        head = load_head(spec)
        tokenizer = await asyncio.to_thread(load_tokenizer, spec)
        if discovery is None:
            from layerchain.discovery import HivemindDiscovery

            discovery = await HivemindDiscovery.create(initial_peers=list(initial_peers))
        if transport is None:
            from layerchain.wire.transport import TcpTransport

            transport = TcpTransport()
        return cls(
            spec=spec, head=head, tokenizer=tokenizer, discovery=discovery,
            transport=transport, config=config, payer=payer,
        )

    async def close(self, settle_s: float = 10.0) -> None:
        try:
            if self.payer is not None:
                await settle_channels(self.payer, settle_s)
        finally:
            await self.peers.close()
            await self.discovery.close()

    async def generate_stream(
        self,
        prompt: str | list[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        result: list[GenerationResult] | None = None,
        limits: RouteLimits | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Yield tokens as they are generated; append the final result to ``result``.
        ``limits`` override the client's routing limits for this generation only.

        A generation that ends early (its consumer stopped iterating, or a step failed)
        still appends a result, with ``finish_reason`` "cancelled", so that what it cost
        (peers were paid for every token computed) can be accounted for."""
        params = params or SamplingParams()
        prompt_ids = encode_prompt(self.tokenizer, prompt, raw=raw)
        t0 = time.perf_counter()
        await self.peers.wait_for_coverage()
        session = InferenceSession(
            self.peers,
            self.spec.hidden_size,
            max_length=len(prompt_ids) + params.max_new_tokens,
            timeout_s=self.config.step_timeout_s,
            payer=self.payer,
            limits=limits,
        )
        decoder = Decoder(self.head, self.tokenizer, prompt_ids, params, self.eos_token_ids)
        ttft = 0.0
        completed = False
        try:
            await session.open()
            self.last_route = tuple(session.route)
            while (x := self._next_input(decoder)) is not None:
                hidden = await session.step(x)
                text = self._accept(decoder, hidden)  # one more token in decoder.stop.token_ids
                token_ids = decoder.stop.token_ids
                if len(token_ids) == 1:
                    ttft = time.perf_counter() - t0
                yield TokenEvent(len(token_ids) - 1, token_ids[-1], text)
            completed = True
        finally:
            self.last_route = route = tuple(session.route)
            await session.close()
            if result is not None:
                res = decoder.result()
                result.append(
                    GenerationResult(
                        text=res.text,
                        token_ids=list(res.token_ids),
                        prompt_tokens=len(prompt_ids),
                        route=route,
                        tokens_per_s=res.tokens_per_s,
                        ttft_s=ttft,
                        recoveries=tuple(session.recoveries),
                        finish_reason=res.finish_reason if completed else "cancelled",
                        hop_ms_per_token=1000 * session.hop_seconds / max(1, session.steps),
                        cost=session.cost,
                        payments=tuple(session.payments.values()),
                    )
                )

    @staticmethod
    @torch.inference_mode()
    def _next_input(decoder: Decoder) -> torch.Tensor | None:
        return decoder.next_input()  # [1, T, H]: the prompt, then one token

    @staticmethod
    @torch.inference_mode()
    def _accept(decoder: Decoder, hidden: torch.Tensor) -> str:
        return decoder.accept(hidden)

    async def generate(
        self,
        prompt: str | list[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        limits: RouteLimits | None = None,
    ) -> GenerationResult:
        result: list[GenerationResult] = []
        async for _ in self.generate_stream(prompt, params, raw=raw, result=result, limits=limits):
            pass
        return result[0]

    def state(self) -> SwarmState:
        """A frozen snapshot of the swarm as this client sees it: nodes (span, price, speed,
        free cache, measured RTT, banned), coverage and the default routing limits. Reads
        what the client holds; ``peers.refresh()`` re-reads the records first if wanted."""
        peers, c = self.peers, self.config
        return swarm_state(
            self.spec.model_id, self.spec.num_blocks, peers.records.values(), peers.rtt_ms,
            peers.banned(),
            RouteLimits(alpha=c.alpha, max_price=c.max_price, max_latency_ms=c.max_latency_ms),
        )

    async def refresh(self) -> None:
        """Re-read the swarm's records if they are stale (or leave a block uncovered)."""
        await self.peers.refresh()


def open_payer(data_dir: str | Path | None, ledger: str | Path, deposit: int) -> ChannelPayer:
    """The client's channels, paid from the wallet in ``data_dir`` on the ledger file."""
    from layerchain.ledger import open_ledger
    from layerchain.market import Wallet

    wallet = Wallet.load_or_create(Path(data_dir or DEFAULT_DATA_DIR).expanduser())
    return ChannelPayer(wallet, open_ledger(Path(ledger).expanduser()), deposit=deposit)


async def settle_channels(payer: ChannelPayer, wait_s: float) -> None:
    """Wait up to ``wait_s`` for each node to redeem what it was promised, then ask the
    ledger to close every channel (the rest of the deposit returns after the dispute window).

    Waiting matters on a ledger without a dispute window, where a close refunds at once and
    a voucher redeemed after it is refused."""
    ledger = payer.ledger
    assert ledger is not None
    channels = payer.channels()
    deadline = time.monotonic() + wait_s
    while channels and time.monotonic() < deadline:
        states = await asyncio.to_thread(lambda: [ledger.channel(c.channel_id) for c in channels])
        if all(state.redeemed >= payer.spent(state.payee) for state in states):
            break
        await asyncio.sleep(0.1)
    for channel in channels:
        try:
            await asyncio.to_thread(ledger.close_channel, channel.channel_id)
        except Exception as error:  # noqa: BLE001 - a refused close must not lose the others
            log.warning("could not close channel %s: %s", channel.channel_id[:10], error)


class Swarm:
    """Synchronous wrapper of ``AsyncSwarm``: ``Swarm(initial_peers=[...]).generate("Hi")``."""

    def __init__(self, initial_peers: Sequence[str] = (), *, model: str = "smollm2", **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="layerchain")
        self._thread.start()
        self._core: AsyncSwarm = self._run(AsyncSwarm.create(initial_peers, model=model, **options))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def core(self) -> AsyncSwarm:
        return self._core

    def generate(
        self,
        prompt: str | list[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        limits: RouteLimits | None = None,
    ) -> GenerationResult:
        return self._run(self._core.generate(prompt, params, raw=raw, limits=limits))

    def stream(
        self,
        prompt: str | list[dict[str, str]],
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        result: list[GenerationResult] | None = None,
        limits: RouteLimits | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield tokens as they arrive; append the final result to ``result`` if given."""
        agen = self._core.generate_stream(prompt, params, raw=raw, result=result, limits=limits)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def close(self) -> None:
        try:
            self._run(self._core.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
