"""Request/reply over a ``Connection``: ``RpcClient`` for callers, ``serve_connection`` for peers.

Client side: ``await RpcClient(conn).call(msg, timeout)`` gives ``msg`` a fresh rid, sends
it, and returns the reply with that rid. Any number of calls may be in flight on one
connection; replies are dispatched by rid, straight from the connection's push callback
(``Connection.set_receiver``: the protocol callback on TCP/TLS). Failures are typed:
* ``ErrorReply(code, message)``  -> ``peer_error(reply)``: the class of a code in
  ``messages.ERROR_CODES``, ``RemoteError`` for any other code;
* no reply within ``timeout``    -> ``PeerTimeout`` (a late reply is dropped and counted);
* the connection drops           -> ``PeerUnreachable`` for every pending and later call;
* a reply of the wrong type      -> ``InvalidOutput``.

Server side: ``serve_connection(conn, handler)`` reads requests and runs
``await handler(msg) -> reply`` in one task per request (at most
``Limits.max_inflight_per_connection`` at once; reading pauses beyond that). The reply
gets the request's rid. A raised ``LayerchainError`` becomes an ``ErrorReply`` with its
``code`` if that is one of ``ERROR_CODES`` (else a code of that set: ``ErrorReply.from_error``);
any other exception is logged and answered as ``remote_error`` (a handler bug never takes
the connection down). A bad frame is answered with ``ErrorReply`` (the rid if
it could be read, else 0); if it broke frame sync the connection then closes. ``Ping`` is
answered here. ``OpenSession`` beyond ``max_sessions_per_connection`` open sessions is
refused with ``LimitExceeded`` before reaching the handler. While sessions are open over
it, the connection is ``pinned`` (a TCP listener at its cap evicts it last).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from layerchain.errors import (
    FrameError,
    InvalidOutput,
    LayerchainError,
    LimitExceeded,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
    error_from_code,
)
from layerchain.wire.codec import DEFAULT_LIMITS, Limits, error_rid
from layerchain.wire.messages import (
    ERROR_CODES,
    REPLY_TYPES,
    ErrorReply,
    Message,
    OpenSession,
    Ping,
    Pong,
    SessionClosed,
    SessionOpened,
)

if TYPE_CHECKING:
    from layerchain.wire.transport import Connection, Incoming

log = logging.getLogger(__name__)

RequestHandler = Callable[[Message], Awaitable[Message | None]]  # request -> reply (None: none)


def peer_error(reply: ErrorReply) -> LayerchainError:
    """The exception for a peer's error reply: the class of its code if it is one of
    ``ERROR_CODES``, else ``RemoteError`` (a peer cannot make its caller raise, say,
    ``InsufficientFunds`` or ``InvalidApiKey``)."""
    if reply.code in ERROR_CODES:
        return error_from_code(reply.code, reply.message)
    return RemoteError(f"peer answered the unknown error code {reply.code[:40]!r}: {reply.message}")


class RpcClient:
    """Concurrent request/reply calls over one connection (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.late_replies = 0  # replies whose call had already timed out or gone
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._rids = itertools.count(1)
        self._listening = False  # replies arrive through conn.set_receiver once called
        self._failure: str | None = None  # why the connection is unusable
        self._last_error: ErrorReply | None = None  # a rid-0 error reply from the peer

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def call(self, msg: Message, timeout: float) -> Message:
        """Send ``msg`` with a fresh rid; its reply within ``timeout`` seconds, or a typed error."""
        if self._failure is not None:
            raise PeerUnreachable(self._failure)
        loop = asyncio.get_running_loop()
        if not self._listening:
            self._listening = True
            self.conn.set_receiver(self._on_incoming)
            if self._failure is not None:  # it had ended before we listened: fail now, not
                raise PeerUnreachable(self._failure)  # after the whole timeout
        rid = next(self._rids)
        msg = dataclasses.replace(msg, rid=rid)
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[rid] = fut
        timer = loop.call_later(timeout, self._expire, fut, msg, timeout)
        try:
            await self.conn.send(msg)
            reply = await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: no "never retrieved" warnings on cancel
        if type(reply) is ErrorReply:
            raise peer_error(reply)
        expected = REPLY_TYPES.get(type(msg))
        if expected is not None and type(reply) is not expected:
            raise InvalidOutput(
                f"{self.conn.peer} answered {type(msg).__name__} with {type(reply).__name__}"
            )
        return reply

    def _expire(self, fut: asyncio.Future[Message], msg: Message, timeout: float) -> None:
        if not fut.done():
            fut.set_exception(
                PeerTimeout(
                    f"{self.conn.peer}: no reply to {type(msg).__name__} within {timeout:g} s"
                )
            )

    def _on_incoming(self, item: Incoming) -> None:
        """Dispatch one reply, bad reply frame (ProtocolError) or PeerUnreachable (the end)."""
        if isinstance(item, PeerUnreachable):
            why = str(item)
            if self._last_error is not None:
                why += f" (peer said {self._last_error.code}: {self._last_error.message})"
            self._fail_all(why)
            return
        if isinstance(item, ProtocolError):  # a bad reply frame: fail its call if known
            fut = self._pending.get(error_rid(item))
            if fut is not None and not fut.done():
                fut.set_exception(item)
            return
        fut = self._pending.get(item.rid)
        if fut is not None and not fut.done():
            fut.set_result(item)
        elif type(item) is ErrorReply and item.rid == 0:
            self._last_error = item
        else:
            self.late_replies += 1

    def _fail_all(self, why: str) -> None:
        self._failure = self._failure or why
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnreachable(self._failure))

    async def close(self) -> None:
        """Fail pending calls with PeerUnreachable and close the connection."""
        self._fail_all("client closed")
        await self.conn.close()


@dataclasses.dataclass
class ServeStats:
    """Counters of one or more served connections (mutable: a tally, not a record)."""

    requests: int = 0  # well-formed requests read
    error_replies: int = 0  # ErrorReply sent, for any cause
    protocol_errors: int = 0  # bad frames received
    by_code: dict[str, int] = dataclasses.field(default_factory=dict)  # error code -> count
    open_sessions: set[str] = dataclasses.field(default_factory=set)  # opened here, not closed

    def count(self, code: str) -> None:
        self.error_replies += 1
        self.by_code[code] = self.by_code.get(code, 0) + 1


async def serve_connection(
    conn: Connection,
    handler: RequestHandler,
    *,
    limits: Limits = DEFAULT_LIMITS,
    stats: ServeStats | None = None,
    reply_delay_s: float = 0.0,
) -> ServeStats:
    """Serve requests on ``conn`` until it closes; then close it and return the tally.

    ``stats.open_sessions`` lists sessions opened over this connection and never closed:
    the caller decides whether to drop them.

    ``reply_delay_s`` (a testing aid, latency emulation) holds back every reply, pings
    included, by that many seconds, without holding back the reading of further requests.
    """
    server = _ConnectionServer(conn, handler, limits, stats or ServeStats(), reply_delay_s)
    await server.run()
    return server.stats


class _ConnectionServer:
    """One served connection: a read loop that answers cheap messages inline and runs every
    request in its own task, at most ``max_inflight_per_connection`` at once."""

    def __init__(
        self,
        conn: Connection,
        handler: RequestHandler,
        limits: Limits,
        stats: ServeStats,
        reply_delay_s: float,
    ) -> None:
        self.conn, self.handler, self.limits, self.stats = conn, handler, limits, stats
        self.reply_delay_s = reply_delay_s
        self.slots = asyncio.Semaphore(limits.max_inflight_per_connection)
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                await self.slots.acquire()  # backpressure: no reading while all slots are busy
                msg = await self._next_request()
                if msg is None:
                    self.slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._handle(msg))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except PeerUnreachable:
            pass
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.conn.close()

    async def _next_request(self) -> Message | None:
        """The next request for the handler, or None once answered here (a bad frame, a
        ping, a message that is no request)."""
        try:
            msg = await self.conn.recv()
        except ProtocolError as error:
            self.stats.protocol_errors += 1
            await self._send_error(ErrorReply.from_error(error_rid(error), error))
            return None  # if sync was lost, the next recv raises PeerUnreachable
        self.stats.requests += 1
        if type(msg) is Ping and not self.reply_delay_s:
            await self.conn.send(Pong(msg.rid, msg.nonce))
            return None
        if type(msg) not in REPLY_TYPES:
            why = f"{type(msg).__name__} is not a request"
            await self._send_error(ErrorReply(msg.rid, FrameError.code, why))
            return None
        return msg

    async def _handle(self, msg: Message) -> None:
        """Run the handler on one request and send its answer (holding one slot until the
        answer is known)."""
        try:
            answer = await self._answer(msg)
        finally:
            self.slots.release()
        if answer is None:
            return
        if answer.rid != msg.rid:
            answer = dataclasses.replace(answer, rid=msg.rid)
        if self.reply_delay_s:
            await asyncio.sleep(self.reply_delay_s)
        try:
            if type(answer) is ErrorReply:
                await self._send_error(answer)
            else:
                await self._send_reply(answer)
        except PeerUnreachable:
            pass

    async def _answer(self, msg: Message) -> Message | None:
        """The handler's reply, or the ErrorReply for what it raised."""
        try:
            self._check_session_cap(msg)
            answer = await self.handler(msg)
        except LayerchainError as error:
            return ErrorReply.from_error(msg.rid, error)
        except Exception as error:
            log.exception("handler failed on %s from %s", type(msg).__name__, self.conn.peer)
            return ErrorReply(msg.rid, RemoteError.code, f"internal error: {type(error).__name__}")
        self._track_sessions(answer)
        return answer

    def _check_session_cap(self, msg: Message) -> None:
        open_sessions = self.stats.open_sessions
        if (
            type(msg) is OpenSession
            and msg.session_id not in open_sessions
            and len(open_sessions) >= self.limits.max_sessions_per_connection
        ):
            raise LimitExceeded(f"{len(open_sessions)} sessions open on this connection, the limit")

    def _track_sessions(self, answer: Message | None) -> None:
        """Note sessions opened and closed here; a TCP listener at its cap evicts a
        connection whose peer holds sessions (``pinned``) only when all of them do."""
        if type(answer) is SessionOpened:
            self.stats.open_sessions.add(answer.session_id)
        elif type(answer) is SessionClosed:
            self.stats.open_sessions.discard(answer.session_id)
        else:
            return
        self.conn.pinned = bool(self.stats.open_sessions)

    async def _send_reply(self, msg: Message) -> None:
        try:
            await self.conn.send(msg)
        except ProtocolError as error:  # the handler's reply breaks the limits
            log.warning("reply to %s breaks the protocol: %s", self.conn.peer, error)
            await self._send_error(ErrorReply.from_error(msg.rid, error))

    async def _send_error(self, reply: ErrorReply) -> None:
        self.stats.count(reply.code)
        await self.conn.send(reply)
