"""The Python API: ``Swarm(initial_peers=...)`` generates text through a swarm of peers.

``AsyncSwarm`` is the asyncio core; ``Swarm`` is its thin synchronous wrapper, running the
core on an event loop in one background thread. The client holds the model's head
(embeddings, final norm, LM head) and tokenizer, so no token id or text is sent; yet the
first hop's inputs are embedding rows, which map back to the ids exactly, unless the client
runs the first ``private_blocks`` itself (README "What each party sees"). The
decode loop is ``layerchain.model.Decoder``, the one ``generate_local`` runs: embed, push
through the hops, logits of the last position, sample, check stop conditions.

A generation is a handle (``Generation``; ``SyncGeneration`` for ``Swarm``), iterated for
its tokens and then read for its ``result``::

    gen = swarm.generate_stream("Hi")       # nothing runs until it is iterated
    async for event in gen:                 # TokenEvent(index, token_id, text)
        ...
    gen.result                              # GenerationResult, also after an early end

Before anything is sent the request is checked against the model's context and the free
cache the peers announce (``RequestTooLarge``), and its prompt's cost against ``max_cost``
(``CostLimitExceeded``); a generation whose next step would pay past ``max_cost`` ends with
finish_reason "max_cost".

Payments: with ``ledger=`` (a ledger spec: a file or ``evm+http://HOST:PORT``,
``layerchain.ledger.open``) the client pays priced peers through payment
channels from the wallet in ``data_dir`` (``Funding`` over a ``ChannelPayer``: a channel
per node, sized to the requests it pays for, or holding ``deposit`` credits if given);
``close()`` waits briefly for the nodes to redeem what they were paid, then asks the ledger
to close the channels (the unspent deposit comes back after the ledger's dispute window).
Receipts are checked with or without a ledger.

Audits (``ClientConfig.audit_rate`` > 0; ``layerchain.client.audit``): hops are re-run on
other peers beside the decode loop. A token is yielded only once every hop's steps up to
it are verified, so a stream never shows a token that is later taken back: when a hop is
caught lying the loop rolls back to its last verified step (``_roll_back``: the route is
reopened without the liar, its caches rebuilt from the kept inputs, the decoder from the
kept outputs) and the tokens come out as an undisturbed run's. ``ttft_s`` is to the first
token shown. A generation that ends early ("cancelled", "max_cost") reports the tokens
shown, not the unverified ones computed after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Sequence, Set
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from layerchain.client.audit import Auditor, Dispute
from layerchain.client.config import ClientConfig, RouteLimits
from layerchain.client.funding import Funding
from layerchain.client.heads import HeadBatcher
from layerchain.client.peers import PeerView
from layerchain.client.rules import check_context, check_room, step_tokens
from layerchain.client.session import HopPayment, InferenceSession, Recovery
from layerchain.client.state import SwarmState, swarm_state
from layerchain.client.timing import StepStamp, TokenTiming, token_timings
from layerchain.discovery import Discovery
from layerchain.errors import ConfigError, CostLimitExceeded
from layerchain.fetch import client_copy, is_model_id
from layerchain.ledger.signatures import Signer
from layerchain.market import ChannelPayer, Wallet
from layerchain.model.adapter import Adapter, load_adapter
from layerchain.model import (
    DecodeResult,
    Decoder,
    SamplingParams,
    encode_prompt,
    load_head,
    load_span,
    resolve_model,
)
from layerchain.model.light_tokenizer import load_client_tokenizer
from layerchain.model.quant import resolve_dtype
from layerchain.model.span import KVCache, SpanModel
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.routing import default_max_price
from layerchain import timings
from layerchain.types import Hop
from layerchain.wire.transport import Dialer, Transport

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("~/.layerchain")  # the wallet's home, as the `wallet` commands use
Prompt = str | Sequence[dict[str, str]]  # text, or chat messages [{"role", "content"}]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it completed (may be empty mid-character)."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class GenerationResult(DecodeResult):
    """What a generation through the swarm produced (``DecodeResult``), where and at what cost.

    ``finish_reason`` adds "cancelled" (ended early: its consumer stopped, or a step failed;
    ``cost`` is what was spent) and "max_cost" (the next step would have paid past it)."""

    route: tuple[Hop, ...] = ()  # the route at the end (after any failover)
    ttft_s: float = 0.0  # seconds from the request to the first token
    recoveries: tuple[Recovery, ...] = ()
    hop_ms_per_token: float = 0.0  # time spent in the hop chain per decode token, ms
    cost: int = 0  # credits paid to the peers (or owed, on a swarm the client does not pay)
    payments: tuple[HopPayment, ...] = ()  # per peer: tokens computed and credits
    disputes: tuple[Dispute, ...] = ()  # hops audits caught lying (banned, unpaid, evidence)
    audited_steps: int = 0  # hop steps compared with a recomputation on another peer
    # per decode step (the first is the prompt's): the client's compute, the route's, the
    # nodes' (client.timing)
    timings: tuple[TokenTiming, ...] = ()


class Generation:
    """One generation: ``async for event in gen`` yields its tokens; ``gen.result`` is its
    ``GenerationResult`` once it ended (ran out, failed, or was closed with ``aclose``).

    Nothing runs until the first ``__anext__``; errors (``RequestTooLarge``, ``NoRoute``,
    ``CostLimitExceeded`` ...) are raised from there. Closing it closes the hop sessions."""

    def __init__(self, swarm: AsyncSwarm, prompt: Prompt, params: SamplingParams, raw: bool,
                 limits: RouteLimits | None, max_cost: int | None = None,
                 exclude: Set[str] = frozenset()) -> None:
        self._result: GenerationResult | None = None
        self._session: InferenceSession | None = None
        self._events = swarm._generate(self, prompt, params, raw, limits, max_cost, exclude)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def route(self) -> tuple[Hop, ...]:
        """The route now (it changes on failover); () before the sessions are open."""
        return tuple(self._session.route) if self._session is not None else ()

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> GenerationResult:
        """The result; RuntimeError while the generation runs, before it starts, and when it
        was refused before any session opened (RequestTooLarge, NoRoute: nothing spent)."""
        if self._result is None:
            raise RuntimeError("the generation has not ended: iterate it to the end or close it")
        return self._result


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
        adapter: Adapter | None = None,
    ) -> None:
        self.spec = spec
        self.payer = payer
        self.funding = Funding(payer, config.deposit_margin) if payer is not None else None
        if adapter is not None:  # fine-tuned (``train finetune``): a prefix, a LoRA head
            adapter.check(spec)
        self.adapter = adapter
        self.head = head if adapter is None else adapter.apply(head)
        self.heads = HeadBatcher(self.head)  # concurrent generations' LM heads, at once
        self.prefix = None if adapter is None else adapter.prefix  # [N, H] before prompts
        self.virtual_tokens = 0 if adapter is None else adapter.virtual_tokens  # N positions
        self.tokenizer = tokenizer
        self.discovery = discovery
        self.transport = transport
        self.config = config
        self.peers = PeerView(discovery, transport, spec.model_id, spec.num_blocks, config)
        # blocks [0, private_blocks) run here: the first hop sees their output, not the
        # embedding rows (which map back to token ids exactly); None: no private blocks
        self.private: SpanModel | None = private_span(
            spec, config.private_blocks, config.device, resolve_dtype(config.dtype, config.device)
        )
        # from the shape, not spec.config: building that imports transformers (~1-2 s)
        self.eos_token_ids = list(spec.shape.eos_token_id)
        self.context_length: int | None = spec.shape.max_position_embeddings
        # hidden states travel in float32 (4 bytes a value): at most this many tokens a Step
        self.step_tokens = step_tokens(spec.hidden_size, 4)
        self.last_route: tuple[Hop, ...] = ()
        # signs evidence against a cheater: the paying wallet, else one for this client only
        self.accuser: Signer = payer.wallet if payer is not None else Wallet.generate()

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        model: str = DEFAULT_MODEL,
        config: ClientConfig | None = None,
        discovery: Discovery | None = None,
        transport: Transport | None = None,
        data_dir: str | Path | None = None,
        ledger: str | Path | None = None,
        deposit: int | None = None,
        adapter: str | Path | Adapter | None = None,
        **options: Any,
    ) -> AsyncSwarm:
        """Join the swarm through ``initial_peers`` (DHT multiaddrs) and load the head;
        with ``ledger``, pay priced peers from the wallet in ``data_dir``, through channels
        holding ``deposit`` credits each (None: sized to each request). ``**options`` are
        ``ClientConfig`` fields; ``alpha``, ``max_price`` and ``max_latency_ms`` given
        loose go into its ``limits``. ``adapter``: a fine-tuned adapter (or its directory,
        ``model.adapter``) applied to every generation."""
        config = client_config(config or ClientConfig(), options)
        if adapter is not None and not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter)  # ConfigError before joining anything
        payer = open_payer(data_dir, ledger, deposit) if ledger is not None else None
        # The DHT joins (on its own thread, with p2pd) while the head loads: a one-shot
        # generate waits for the longer of the two, not their sum (issue 21 item 5).
        joining = asyncio.ensure_future(join_as_client(initial_peers)) if discovery is None else None
        try:
            with timings.timed("head_load"):
                if is_model_id(model):  # named by id: head and tokenizer from the peers seeding
                    dht = await joining if joining is not None else discovery  # them, unless here
                    assert dht is not None  # (given, or joining)
                    model = str(await client_copy(dht, transport or Dialer(
                        insecure=config.insecure, connect_timeout_s=config.connect_timeout_s),
                        model))
                spec = await asyncio.to_thread(resolve_model, model)
                check_private_blocks(spec, config.private_blocks)
                # on the loop thread, where the decode loop runs the head: a second live thread
                # that ran torch ops would slow every step (layerchain.node.server on libgomp)
                # the form is part of the model's id (ModelSpec.in_form): a client in int8
                # routes through int8 nodes, and audits them in int8
                spec = spec.in_form(resolve_dtype(config.dtype, config.device))
                head = load_head(spec, device=config.device)
                # from its card when one was written: no transformers import (light_tokenizer)
                tokenizer = await asyncio.to_thread(load_client_tokenizer, spec)
            if joining is not None:
                discovery = await joining
        except BaseException:
            if joining is not None:
                await abandon_join(joining)
            raise
        assert discovery is not None
        if transport is None:  # TLS, checking each peer's id; plaintext only if insecure
            transport = Dialer(
                insecure=config.insecure, connect_timeout_s=config.connect_timeout_s
            )
        return cls(
            spec=spec, head=head, tokenizer=tokenizer, discovery=discovery,
            transport=transport, config=config, payer=payer, adapter=adapter,
        )

    async def close(self, settle_s: float = 10.0) -> None:
        try:
            if self.funding is not None:
                await self.funding.settle(settle_s)
        finally:
            await self.peers.close()
            await self.discovery.close()

    def generate_stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        limits: RouteLimits | None = None,
        max_cost: int | None = None,
        exclude: Set[str] = frozenset(),
    ) -> Generation:
        """A generation to iterate (``async for``) and then read (``.result``).
        ``limits`` (routing) and ``max_cost`` (credits in all) replace the client's for
        this generation only; None keeps the client's. ``exclude``: peer ids its route
        (and any failover) never uses (audits may still re-run a hop elsewhere)."""
        return Generation(self, prompt, params or SamplingParams(), raw, limits, max_cost,
                          exclude)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        limits: RouteLimits | None = None,
        max_cost: int | None = None,
        exclude: Set[str] = frozenset(),
    ) -> GenerationResult:
        """Generate to the end; the result."""
        gen = self.generate_stream(prompt, params, raw=raw, limits=limits, max_cost=max_cost,
                                   exclude=exclude)
        async for _ in gen:
            pass
        return gen.result

    async def _generate(
        self, gen: Generation, prompt: Prompt, params: SamplingParams, raw: bool,
        limits: RouteLimits | None, max_cost: int | None = None,
        exclude: Set[str] = frozenset(),
    ) -> AsyncGenerator[TokenEvent, None]:
        """The decode loop behind ``gen``; sets ``gen._result`` however it ends (a generation
        that ended early, with finish_reason "cancelled", still says what it cost)."""
        prompt_ids = encode_prompt(self.tokenizer, prompt, raw=raw)
        t0 = time.perf_counter()
        virtual = self.virtual_tokens  # the adapter's prefix positions, before the prompt
        check_context(len(prompt_ids) + virtual, params.max_new_tokens, self.context_length)
        await self.peers.wait_for_coverage()
        max_length = len(prompt_ids) + virtual + params.max_new_tokens
        check_room(self.peers.records.values(), max_length, self.spec.num_blocks,
                   self.config.private_blocks)
        audit_rate = self.config.audit_rate
        session = gen._session = InferenceSession(
            self.peers, max_length, step_tokens=self.step_tokens, funding=self.funding,
            limits=limits, max_cost=max_cost, pay_when_verified=audit_rate > 0,
            blocks=(self.config.private_blocks, None), exclude=frozenset(exclude),
        )
        private = self.private.new_cache(max_length=max_length) if self.private else None
        auditor = None
        if audit_rate > 0:
            auditor = Auditor(session, audit_rate, accuser=self.accuser,
                              submit=self.funding is not None, spec=self.spec)
        decoder = Decoder(self.head, self.tokenizer, prompt_ids, params, self.eos_token_ids,
                          prefix=self.prefix)
        # per decode step: its input [1, T, H], the last position of its output [1, 1, H]
        # (to rebuild the decoder on a rollback) and its token, yielded once verified
        inputs: list[torch.Tensor] = []
        finals: list[torch.Tensor] = []
        events: list[TokenEvent] = []
        stamps: list[StepStamp] = []  # per decode step, where its time went (client.timing)
        shown = 0  # events yielded
        ttft = 0.0
        finish: str | None = "cancelled"  # None: the decoder's own reason
        self.heads.active += 1
        try:
            await session.open(prompt_tokens=len(prompt_ids))  # CostLimitExceeded: the prompt
            self.last_route = tuple(session.route)
            while True:
                began = time.perf_counter()
                x = self._route_input(decoder, private)
                embedded = time.perf_counter()
                if auditor is not None and auditor.dispute is None and x is not None:
                    await auditor.make_room(int(x.shape[1]))
                if auditor is not None and x is None:
                    await auditor.finish()  # every step verified, or a liar found (dispute)
                if auditor is not None and auditor.dispute is not None:
                    decoder = await self._roll_back(session, auditor, decoder, prompt_ids,
                                                    params, inputs, finals, events, private)
                    continue
                if x is None:
                    finish = None
                    break
                try:
                    hidden = await session.step(x)
                except CostLimitExceeded:
                    if not decoder.stop.token_ids:
                        raise
                    finish = "max_cost"
                    break
                routed = time.perf_counter()
                logits = await self.heads.logits(hidden[:, -1:])  # with other streams' rows
                text = self._accept_logits(decoder, logits)  # one more token in .stop.token_ids
                ended = time.perf_counter()
                stamps.append(StepStamp(began, ended, embedded - began + ended - routed,
                                        session.step_seconds, tuple(session.node_ms)))
                token_ids = decoder.stop.token_ids
                inputs.append(x)
                finals.append(hidden[:, -1:])
                events.append(TokenEvent(len(token_ids) - 1, token_ids[-1], text))
                ready = len(events)
                if auditor is not None:
                    auditor.after_step()
                    ready = verified_steps(auditor.settled_position(),
                                           len(prompt_ids) + self.virtual_tokens, ready)
                while shown < ready:
                    if shown == 0:
                        ttft = time.perf_counter() - t0
                    shown += 1
                    yield events[shown - 1]
            while shown < len(events) and finish is None:  # the last ones, verified by finish()
                if shown == 0:
                    ttft = time.perf_counter() - t0
                shown += 1
                yield events[shown - 1]
        finally:
            self.heads.active -= 1
            self.last_route = route = tuple(session.route)
            if auditor is not None:
                await auditor.close()
            await session.settle()  # the last verified window, paid now
            await session.close()
            decoded = decoder.result()
            if auditor is not None and finish is not None:  # stopped early: what was shown
                decoded = shown_result(decoded, events[:shown], decoder)
            gen._result = GenerationResult(
                **{f.name: getattr(decoded, f.name) for f in fields(DecodeResult)},
                route=route,
                ttft_s=ttft,
                recoveries=tuple(session.recoveries),
                hop_ms_per_token=1000 * session.hop_seconds / max(1, session.steps),
                cost=session.cost,
                payments=tuple(session.payments.values()),
                disputes=tuple(auditor.disputes) if auditor is not None else (),
                audited_steps=auditor.audited_steps if auditor is not None else 0,
                timings=token_timings(stamps),
            )
            if finish is not None:
                gen._result = replace(gen._result, finish_reason=finish)

    async def _roll_back(
        self, session: InferenceSession, auditor: Auditor, decoder: Decoder,
        prompt_ids: list[int], params: SamplingParams, inputs: list[torch.Tensor],
        finals: list[torch.Tensor], events: list[TokenEvent], private: KVCache | None = None,
    ) -> Decoder:
        """A hop lied: go back to the last verified decode step, reopen the route without
        the banned liar, rebuild its caches from the verified steps' inputs and the decoder
        from their outputs (so the tokens already verified stay exactly the same). The
        lists are cut to the verified steps in place; returns the rebuilt decoder."""
        dispute = auditor.dispute
        assert dispute is not None
        keep = verified_steps(auditor.settled_position(), len(prompt_ids) + self.virtual_tokens,
                              len(events))
        log.warning("rolling back to decode step %d after peer %s lied at position %d",
                    keep, dispute.peer_id, dispute.position)
        prefix = torch.cat(inputs[:keep], dim=1) if keep else None
        if private is not None:  # the private blocks' cache forgets the steps rolled back
            private.truncate(int(prefix.shape[1]) if prefix is not None else 0)
        old = await session.restart(prefix)
        auditor.restart(old, int(prefix.shape[1]) if prefix is not None else 0)
        del inputs[keep:], finals[keep:], events[keep:]
        decoder = Decoder(self.head, self.tokenizer, prompt_ids, params, self.eos_token_ids,
                          prefix=self.prefix)
        for out in finals:
            self._accept(decoder, out)
        return decoder

    def state(self) -> SwarmState:
        """A frozen snapshot of the swarm as this client sees it: nodes (span, price, speed,
        free cache, measured RTT, banned), coverage and the default routing limits, whose
        ``max_price`` is the one the planner applies when a generation gives none (the
        configured one, else ``max_price_multiple`` x the median price per block). Reads
        what the client holds; ``refresh()`` re-reads the records first if wanted."""
        peers, c = self.peers, self.config
        limits = c.limits
        if limits.max_price is None and c.max_price_multiple is not None and peers.records:
            limits = replace(limits, max_price=default_max_price(  # credits per token
                peers.block_prices(), c.private_blocks, self.spec.num_blocks,
                c.max_price_multiple))
        return swarm_state(
            self.spec.model_id, self.spec.num_blocks, peers.records.values(), peers.rtt_ms,
            peers.banned(), limits, c.private_blocks,
        )

    async def refresh(self) -> None:
        """Re-read the swarm's records if they are stale (or leave a block uncovered)."""
        await self.peers.refresh()

    @torch.inference_mode()
    def _route_input(self, decoder: Decoder, private: KVCache | None) -> torch.Tensor | None:
        """What the route's first hop gets next, [1, T, H] (the prompt, then one token): the
        decoder's embedding rows, through the private blocks if the client keeps any.
        None when the decoder is done."""
        x = decoder.next_input()
        if x is None or private is None or self.private is None:
            return None if x is None else x.cpu()  # the wire's side (no copy on a CPU)
        return self.private(x, private).cpu()

    @staticmethod
    @torch.inference_mode()
    def _accept(decoder: Decoder, hidden: torch.Tensor) -> str:
        return decoder.accept(hidden)

    @staticmethod
    @torch.inference_mode()
    def _accept_logits(decoder: Decoder, logits: torch.Tensor) -> str:
        return decoder.accept_logits(logits)


#: ``RouteLimits`` fields a caller may still pass loose (``Swarm(alpha=1)``).
LOOSE_LIMITS = ("alpha", "max_price", "max_latency_ms")


def client_config(base: ClientConfig, options: dict[str, Any]) -> ClientConfig:
    """``base`` with ``options`` (ClientConfig fields) replaced; loose ``alpha``,
    ``max_price`` and ``max_latency_ms`` replace those of its ``limits`` (ConfigError,
    one line, for a bad value)."""
    options = dict(options)
    loose = {name: options.pop(name) for name in LOOSE_LIMITS if name in options}
    config = replace(base, **options)
    if loose:
        config = replace(config, limits=replace(config.limits, **loose))
    return config


async def join_as_client(initial_peers: Sequence[str]) -> Discovery:
    """A DHT client on ``initial_peers``: it reads records and serves no DHT requests, so
    peers on other hosts never keep (and time out dialling) its loopback or NATed address."""
    from layerchain.discovery import HivemindDiscovery  # hivemind: only a client that joins

    with timings.timed("dht_join"):
        return await HivemindDiscovery.create(initial_peers=list(initial_peers),
                                              client_mode=True)


async def abandon_join(joining: asyncio.Future[Discovery]) -> None:
    """Stop a join started by ``create`` that failed elsewhere: close the DHT if it got up."""
    if not joining.done():
        joining.cancel()
    with contextlib.suppress(BaseException):
        await (await joining).close()


def check_private_blocks(spec: Any, blocks: int) -> None:
    """ConfigError unless ``0 <= blocks < num_blocks`` of ``spec``'s model (at least the
    last block is routed: with none, generate --local is the tool)."""
    if type(blocks) is not int or not 0 <= blocks < spec.num_blocks:
        raise ConfigError(
            f"private_blocks must be an integer in 0..{spec.num_blocks - 1} for "
            f"{spec.name}, got {blocks!r}",
            hint="pass --private-blocks N below the model's block count, or --local",
        )


def private_span(
    spec: Any, blocks: int, device: str = "cpu", dtype: str = "fp32"
) -> SpanModel | None:
    """Blocks ``[0, blocks)`` of ``spec``'s model, loaded for a client that runs them itself
    (None for 0); ConfigError as ``check_private_blocks``."""
    check_private_blocks(spec, blocks)
    return load_span(spec, 0, blocks, device=device, dtype=dtype) if blocks else None


def verified_steps(settled: int, prompt_tokens: int, steps: int) -> int:
    """Decode steps (of ``steps`` done) whose token positions are all below ``settled``:
    step 0 covers the prompt ``[0, prompt_tokens)``, step ``j >= 1`` position
    ``prompt_tokens + j - 1``."""
    if settled < prompt_tokens:
        return 0
    return min(steps, 1 + settled - prompt_tokens)


def shown_result(decoded: DecodeResult, shown: list[TokenEvent], decoder: Decoder) -> DecodeResult:
    """The result of a generation that stopped early with audits on: the tokens shown (the
    verified ones), not those computed after them."""
    if len(shown) == len(decoded.token_ids):
        return decoded
    return replace(decoded, text="".join(e.text for e in shown),
                   token_ids=tuple(e.token_id for e in shown))


def open_payer(data_dir: str | Path | None, ledger: str | Path, deposit: int | None) -> ChannelPayer:
    """The client's channels, paid from the wallet in ``data_dir`` on the ledger file
    (``deposit`` None or 0: channels sized per request by ``Funding``)."""
    from layerchain.ledger import CheckpointStore, open_ledger
    from layerchain.market import Wallet

    home = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    wallet = Wallet.load_or_create(home)
    # the wallet also pays the gas of the client's own redemptions (the final window's)
    return ChannelPayer(wallet, open_ledger(ledger, sender=wallet), deposit=deposit or 0,
                        checkpoints=CheckpointStore.for_data_dir(home))


class Swarm:
    """Synchronous wrapper of ``AsyncSwarm``: ``Swarm(initial_peers=[...]).generate("Hi")``."""

    def __init__(self, initial_peers: Sequence[str] = (), *, model: str = DEFAULT_MODEL, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="layerchain")
        self._thread.start()
        self._core: AsyncSwarm = self._run(AsyncSwarm.create(initial_peers, model=model, **options))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the swarm's event loop and return its result (for tools built on
        ``core``, such as training through the swarm, ``train.remote``)."""
        return self._run(coro)

    @property
    def core(self) -> AsyncSwarm:
        return self._core

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        limits: RouteLimits | None = None,
        max_cost: int | None = None,
    ) -> GenerationResult:
        return self._run(self._core.generate(prompt, params, raw=raw, limits=limits,
                                             max_cost=max_cost))

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        limits: RouteLimits | None = None,
        max_cost: int | None = None,
    ) -> SyncGeneration:
        """A generation to iterate (``for event in gen``) and then read (``gen.result``)."""
        return SyncGeneration(self, self._core.generate_stream(
            prompt, params, raw=raw, limits=limits, max_cost=max_cost))

    def close(self) -> None:
        try:
            self._run(self._core.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():  # its self-pipe sockets go with it
                self._loop.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SyncGeneration:
    """``Generation`` for synchronous code: ``for event in gen: ...``, then ``gen.result``.
    Leaving the loop early (break, an exception) closes the generation."""

    def __init__(self, swarm: Swarm, generation: Generation) -> None:
        self._swarm, self._gen = swarm, generation

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                try:
                    yield self._swarm._run(self._gen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self._gen.done:
            self._swarm._run(self._gen.aclose())

    def __enter__(self) -> SyncGeneration:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def route(self) -> tuple[Hop, ...]:
        return self._gen.route

    @property
    def done(self) -> bool:
        return self._gen.done

    @property
    def result(self) -> GenerationResult:
        return self._gen.result
