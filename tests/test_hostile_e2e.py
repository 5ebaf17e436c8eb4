"""Hostile input at a real node process, while an honest client keeps getting the right answer.

One swarm for the module: T (0:15) is the target, started with small limits (200 sessions,
2048 cache tokens: 512 per session, 1024 per connection; 64 connections, a 2 s read
timeout, sessions that never step closed after 15 s); S (0:15) is its spare and U (15:30)
serves the other blocks (each with the hostile bench's cache budget: the module's last tests
run ``bench hostile``'s reduced attacks on this swarm, tests/test_bench_hostile.py). During every attack a background thread generates with an honest
client, through T or, while T refuses it, through S; every answer must be the reference.
Each attack must end in typed error replies or closed connections, T's memory must stay
within a bound, and at the end a route through T must still give the reference answer
with no traceback in T's log.

The swarm serves plaintext tcp:// (``insecure``): the attacks write raw bytes, half-close
sockets (which TLS cannot) and dial with TcpTransport. The frame, session and connection
defences they test are the same code under TLS; tests/test_wire_tls.py attacks a TLS
listener (huge prefixes, stalled handshakes and frames, the connection cap).
"""

from __future__ import annotations

import asyncio
import random
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch

from layerchain.bench.attacks import ATTACKS
from layerchain.bench.hostile import MAX_CACHE_TOKENS as BENCH_CACHE_TOKENS
from layerchain.errors import FrameError, LimitExceeded, PeerBusy, VersionMismatch
from layerchain.local import swarm_down, swarm_up
from layerchain.model import DEFAULT_MODEL, SamplingParams
from layerchain.types import Span
from layerchain.wire import (
    ErrorReply,
    Info,
    InfoReply,
    OpenSession,
    Pong,
    RpcClient,
    SessionOpened,
    Step,
    StepResult,
    TcpTransport,
    decode,
    encode_bytes,
)
from layerchain.wire.tcp import parse_tcp_endpoint
from test_bench_hostile import BLOCKED_BY_NOW, IN_TEST, TEST_OPTIONS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=12)
MAX_SESSIONS = 200
MAX_CACHE_TOKENS = 2048
MAX_CONNECTIONS = 64
SESSION_TOKENS = MAX_CACHE_TOKENS // 4  # the default share of one session
CONNECTION_TOKENS = MAX_CACHE_TOKENS // 2  # and of one connection
READ_TIMEOUT_S = 2.0
FIRST_STEP_TIMEOUT_S = 15.0  # long enough for phase B of the sessions test on a loaded machine
# (its ~32 prefills of 64 tokens, queued at once, run in a few seconds at CI); the squatters
# test waits this long for its reservations to expire
TARGET_ARGS = (
    "--max-sessions", str(MAX_SESSIONS), "--max-cache-tokens", str(MAX_CACHE_TOKENS),
    "--max-connections", str(MAX_CONNECTIONS), "--read-timeout", str(READ_TIMEOUT_S),
    "--first-step-timeout", str(FIRST_STEP_TIMEOUT_S),
)
MiB = 1 << 20
BENCH_ARGS = ("--max-cache-tokens", str(BENCH_CACHE_TOKENS))  # the spare and the tail


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """(local swarm, honest client); nodes[0] is the target T, nodes[1] its spare S."""
    from layerchain.client import Swarm

    state = tmp_path_factory.mktemp("hostile")
    local = swarm_up(state, [Span(0, 15), Span(0, 15), Span(15, 30)],
                     node_args=[TARGET_ARGS, BENCH_ARGS, BENCH_ARGS], insecure=True)
    try:
        with Swarm(local.initial_peers, step_timeout_s=10.0, ban_base_s=3.0,
                   insecure=True) as client:
            yield local, client
    finally:
        swarm_down(state, quiet=True)


@pytest.fixture
def target(swarm):
    local, _ = swarm
    node = local.nodes[0]
    host, port = parse_tcp_endpoint(node["endpoint"])
    return {**node, "host": host, "port": port}


class HonestTraffic:
    """Generates back to back in a thread until stopped; ``check()`` asserts every answer."""

    def __init__(self, client, reference: list[int]) -> None:
        self.client = client
        self.reference = reference
        self.answers: list[tuple[list[int], list[str]]] = []  # (token ids, route peer ids)
        self.errors: list[str] = []
        self._started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                gen = self.client.stream(PROMPT, PARAMS)
                for _ in gen:
                    self._started.set()
                res = gen.result
                self.answers.append((res.token_ids, [h.peer_id for h in res.route]))
            except Exception as error:  # noqa: BLE001 - reported by check()
                self.errors.append(repr(error))
                self._started.set()

    def __enter__(self):
        """Start generating; return once the first token of the first answer arrived."""
        self._thread.start()
        assert self._started.wait(60), "the honest client produced no token"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the honest client hung"

    def check(self) -> None:
        assert not self.errors, self.errors
        assert self.answers, "no honest generation completed"
        for token_ids, route in self.answers:
            assert token_ids == self.reference, route


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# ------------------------------------------------------------------------------- raw frames


def frame(header: list, payload: bytes = b"") -> bytes:
    """A frame as codec.py lays it out, from a header list we choose freely."""
    packed = msgpack.packb(header, use_bin_type=True)
    pad = b"\0" * (-(8 + len(packed)) & 7) if payload else b""
    body = struct.pack(">I", len(packed)) + packed + pad + payload
    return struct.pack(">I", len(body)) + body


def step_frame(descriptor: list, payload: bytes, step: object = 0) -> bytes:
    return frame([1, Step.TYPE_ID, 5, "sid", step, descriptor, b""], payload)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 5.0):
    """The next message, or None if the connection closed first."""
    try:
        prefix = await asyncio.wait_for(reader.readexactly(4), timeout)
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(prefix, "big")), timeout)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return decode(prefix + body)


async def exchange(host: str, port: int, data: bytes, *, eof: bool = False):
    """Send ``data`` on a new connection (then EOF if asked); the reply or None if closed."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        return await read_reply(reader)
    except ConnectionError:
        return None
    finally:
        writer.close()


async def closed_soon(reader: asyncio.StreamReader, wait: float = 0.001) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), wait)
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


async def info(endpoint: str) -> InfoReply:
    rpc = RpcClient(await TcpTransport().connect(endpoint))
    try:
        return await rpc.call(Info(0), 5.0)
    finally:
        await rpc.close()


# ------------------------------------------------------------------------------- the attacks


def test_malformed_frames_and_garbage_get_typed_errors_or_a_closed_connection(
    swarm, target, reference, smollm2_spec
):
    H = smollm2_spec.hidden_size
    zeros = torch.zeros
    cases: dict[str, tuple[bytes, set[str | None]]] = {
        "dtype int64": (step_frame(["int64", [1, 1, H], 8 * H], bytes(8 * H)), {"limit_exceeded"}),
        "dtype float64": (step_frame(["float64", [1, 1, H], 8 * H], bytes(8 * H)),
                          {"limit_exceeded"}),
        "nbytes off by 4": (step_frame(["float32", [1, 1, H], 4 * H - 4], bytes(4 * H - 4)),
                            {"frame_error"}),
        "2-D tensor": (step_frame(["float32", [1, H], 4 * H], bytes(4 * H)), {"limit_exceeded"}),
        "empty axis": (step_frame(["float32", [1, 0, H], 0], b""), {"limit_exceeded"}),
        "axis of 2**40": (step_frame(["float32", [1, 2**40, H], 4 * H], bytes(4 * H)),
                          {"limit_exceeded"}),
        "payload shorter than shape": (step_frame(["float32", [1, 64, H], 4 * 64 * H],
                                                  bytes(4 * H)), {"frame_error"}),
        "step is a string": (step_frame(["float32", [1, 1, H], 4 * H], bytes(4 * H), "0"),
                             {"frame_error"}),
        "hidden size 7": (encode_bytes(Step(5, "sid", 0, zeros(1, 1, 7))), {"limit_exceeded"}),
        "batch of 2": (encode_bytes(Step(5, "sid", 0, zeros(2, 1, H))), {"limit_exceeded"}),
        "unknown session": (encode_bytes(Step(5, "sid", 0, zeros(1, 1, H))),
                            {"unknown_session"}),
        "float16 NaNs, unknown session": (
            encode_bytes(Step(5, "sid", 0, torch.full((1, 1, H), float("nan")).half())),
            {"unknown_session"}),
        "unknown message type": (frame([1, 99, 5]), {"frame_error"}),
        "protocol version 9": (frame([9, Info.TYPE_ID, 5]), {"version_mismatch"}),
        "a reply sent as a request": (encode_bytes(Pong(5, 1)), {"frame_error"}),
        "header is a map": (frame({"a": 1}), {"frame_error"}),  # type: ignore[arg-type]
        "trailing bytes": (frame([1, Info.TYPE_ID, 5], b"\1" * 8), {"frame_error"}),
        "OpenSession for blocks 0:30": (
            encode_bytes(OpenSession(5, "x", smollm2_spec.model_id, 0, 30, 16)),
            {"limit_exceeded"}),
        "OpenSession of another model": (encode_bytes(OpenSession(5, "x", "f" * 64, 0, 15, 16)),
                                         {"limit_exceeded"}),
        "OpenSession of max_length 0": (
            encode_bytes(OpenSession(5, "x", smollm2_spec.model_id, 0, 15, 0)),
            {"limit_exceeded"}),
        "OpenSession of max_length 2**40": (
            encode_bytes(OpenSession(5, "x", smollm2_spec.model_id, 0, 15, 2**40)),
            {"limit_exceeded"}),
        "length prefix 2**32-1": ((2**32 - 1).to_bytes(4, "big"), {"limit_exceeded", None}),
        "truncated Step, then EOF": (
            encode_bytes(Step(5, "sid", 0, zeros(1, 4, H)))[: 2 * H], {"frame_error", None}),
    }
    rng = random.Random(5)
    valid = [encode_bytes(m) for m in (
        Step(5, "sid", 0, zeros(1, 2, H)), Info(5),
        OpenSession(5, "mutant", smollm2_spec.model_id, 0, 15, 8),
    )]

    async def attack():
        host, port = target["host"], target["port"]
        replies = {name: await exchange(host, port, data, eof=True)
                   for name, (data, _) in cases.items()}
        # Framed garbage on one connection: random bodies, random headers, valid frames with
        # random bytes flipped (never the length prefix, so frame sync holds): one reply each.
        reader, writer = await asyncio.open_connection(host, port)
        framed = []
        for i in range(300):
            kind = i % 3
            if kind == 0:
                body = rng.randbytes(rng.randrange(0, 512))
            elif kind == 1:
                head = rng.randbytes(rng.randrange(1, 64))
                body = struct.pack(">I", len(head)) + head + rng.randbytes(rng.randrange(0, 64))
            else:
                data = bytearray(rng.choice(valid))
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(4, len(data))] = rng.randrange(256)
                body = bytes(data[4:])
            writer.write(len(body).to_bytes(4, "big") + body)
            framed.append(await read_reply(reader))
        writer.close()
        # Unframed garbage (random length prefixes), then EOF: a reply, or the connection ends.
        streams = [rng.randbytes(rng.randrange(1, 64 * 1024)) for _ in range(20)]
        unframed = await asyncio.gather(*(exchange(host, port, s, eof=True) for s in streams))
        return replies, framed, unframed, await info(target["endpoint"])

    with HonestTraffic(swarm[1], reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids) as honest:
        replies, framed, unframed, after = asyncio.run(asyncio.wait_for(attack(), 120))
    honest.check()
    for name, (_, expected) in cases.items():
        reply = replies[name]
        code = reply.code if isinstance(reply, ErrorReply) else reply
        assert code in expected, (name, reply)
    assert all(r is not None for r in framed), "a framed bad request went unanswered"
    codes = {r.code for r in framed if isinstance(r, ErrorReply)}
    protocol_codes = {FrameError.code, LimitExceeded.code, VersionMismatch.code}
    assert codes <= protocol_codes | {"unknown_session", "busy"}, codes
    assert sum(isinstance(r, ErrorReply) for r in framed) >= 250
    assert all(r is None or isinstance(r, ErrorReply) for r in unframed)
    assert (after.peer_id, after.start, after.end) == (target["peer_id"], 0, 15)
    print(f"{len(cases)} malformed frames, {len(framed)} framed and {len(unframed)} unframed "
          f"garbage inputs; honest answers during them: {len(honest.answers)}")


def test_thousands_of_sessions_are_refused_busy_and_memory_stays_bounded(
    swarm, target, reference, smollm2_spec
):
    H, model_id = smollm2_spec.hidden_size, smollm2_spec.model_id
    cfg = smollm2_spec.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    kv_budget = MAX_CACHE_TOKENS * 15 * 2 * kv_heads * head_dim * 4  # bytes, float32 K and V
    rss_before = rss_bytes(target["pid"])

    async def open_many(rpc: RpcClient, tag: str, count: int, max_length: int):
        calls = [rpc.call(OpenSession(0, f"{tag}-{i}", model_id, 0, 15, max_length), 10.0)
                 for i in range(count)]
        return await asyncio.gather(*calls, return_exceptions=True)

    async def attack():
        transport = TcpTransport()
        # Phase A: 2,030 tiny sessions over 40 connections; the first asks for 80 (> 64 on one
        # connection), the others for 50 each, all at once.
        rpcs = [RpcClient(await transport.connect(target["endpoint"])) for _ in range(40)]
        first = await open_many(rpcs[0], "a0", 80, 1)
        rest = await asyncio.gather(*(open_many(r, f"a{i}", 50, 1) for i, r in enumerate(rpcs)
                                      if i > 0))
        phase_a = first + [x for xs in rest for x in xs]
        for rpc in rpcs:  # a client gone: its sessions are closed
            await rpc.close()
        # Phase B: sessions as large as the cache allows, each with a 64-token prefill as soon
        # as it is open (sessions that never step expire), so the KV caches are really
        # allocated; a few impossible requests too.
        rpcs = [RpcClient(await transport.connect(target["endpoint"])) for _ in range(16)]

        async def open_and_step(rpc: RpcClient, sid: str):
            [opened] = await asyncio.gather(
                rpc.call(OpenSession(0, sid, model_id, 0, 15, 64), 10.0), return_exceptions=True)
            if not isinstance(opened, SessionOpened):
                return opened, None
            step = rpc.call(Step(0, sid, 0, torch.randn(1, 64, H)), 60.0)
            return opened, (await asyncio.gather(step, return_exceptions=True))[0]

        pairs = await asyncio.gather(*(open_and_step(r, f"b{i}-{j}")
                                       for i, r in enumerate(rpcs) for j in range(20)))
        phase_b = [opened for opened, _ in pairs]
        steps = [step for _, step in pairs if step is not None]
        odd = await open_many(rpcs[0], "odd", 1, 10**9) + await open_many(rpcs[0], "neg", 1, -5)
        rss_full = rss_bytes(target["pid"])
        for rpc in rpcs:
            await rpc.close()
        return phase_a, phase_b, odd, steps, rss_full

    with HonestTraffic(swarm[1], reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids) as honest:
        phase_a, phase_b, odd, steps, rss_full = asyncio.run(asyncio.wait_for(attack(), 180))
    honest.check()

    def tally(replies):
        out: dict[str, int] = {}
        for r in replies:
            key = "opened" if isinstance(r, SessionOpened) else getattr(r, "code", repr(r))
            out[key] = out.get(key, 0) + 1
        return out

    a, b = tally(phase_a), tally(phase_b)
    assert set(a) <= {"opened", PeerBusy.code, LimitExceeded.code}, a
    assert MAX_SESSIONS - 2 <= a["opened"] <= MAX_SESSIONS, a  # less what honest ones held
    assert a[LimitExceeded.code] == 16, a  # the 65th..80th on one connection
    assert a[PeerBusy.code] == 2030 - a["opened"] - 16, a
    assert set(b) <= {"opened", PeerBusy.code}, b
    assert MAX_CACHE_TOKENS // 64 - 2 <= b["opened"] <= MAX_CACHE_TOKENS // 64, b
    assert [getattr(x, "code", x) for x in odd] == [LimitExceeded.code, LimitExceeded.code], odd
    assert all(isinstance(s, StepResult) for s in steps), [s for s in steps if not isinstance(s, StepResult)][:3]
    growth = rss_full - rss_before
    assert growth < kv_budget + 96 * MiB, (growth / MiB, kv_budget / MiB)

    async def free_tokens_after_close() -> int:
        deadline = time.monotonic() + 10
        while True:
            free = (await info(target["endpoint"])).free_cache_tokens
            if free == SESSION_TOKENS or time.monotonic() > deadline:
                return free
            await asyncio.sleep(0.2)

    assert asyncio.run(free_tokens_after_close()) == SESSION_TOKENS  # what it announces
    print(f"sessions: phase A {a}, phase B {b}; RSS {rss_before / MiB:.0f} -> "
          f"{rss_full / MiB:.0f} MiB with the cache full (KV budget {kv_budget / MiB:.0f} MiB); "
          f"honest answers during it: {len(honest.answers)}")


def test_idle_sockets_tricklers_and_stalled_frames_do_not_stop_honest_service(
    swarm, target, reference, smollm2_spec
):
    host, port, endpoint = target["host"], target["port"], target["endpoint"]
    H = smollm2_spec.hidden_size
    rss_before = rss_bytes(target["pid"])

    async def attack():
        idle = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(200)))
        await asyncio.sleep(0.5)
        closed = [await closed_soon(r, 0.01) for r, _ in idle]
        held = closed.count(False)
        await asyncio.sleep(2.5)  # now they are quiet: a newcomer takes the place of one
        served = await info(endpoint)

        async def trickle() -> float:
            reader, writer = await asyncio.open_connection(host, port)
            data = encode_bytes(Step(1, "s", 0, torch.zeros(1, 1, H)))
            t0 = time.monotonic()
            try:
                for byte in data:  # never idle for the read timeout, never done either
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.3)
                    if await closed_soon(reader):
                        break
            except ConnectionError:
                pass
            writer.close()
            return time.monotonic() - t0

        async def stall(mib: int) -> float:
            reader, writer = await asyncio.open_connection(host, port)
            t0 = time.monotonic()
            try:  # a 48 MiB frame of which only ``mib`` MiB ever arrive: the node may refuse
                writer.write((48 * MiB).to_bytes(4, "big") + bytes(mib * MiB))  # it at once
                await writer.drain()
            except ConnectionError:
                writer.close()
                return time.monotonic() - t0
            while not await closed_soon(reader, 0.2):
                if time.monotonic() - t0 > 30:
                    break
            writer.close()
            return time.monotonic() - t0

        async def huge_prefix():
            return await exchange(host, port, (2**32 - 1).to_bytes(4, "big") + b"x" * 64)

        results = await asyncio.gather(
            *(trickle() for _ in range(3)), *(stall(8) for _ in range(4)),
            *(huge_prefix() for _ in range(5)),
        )
        still_idle = [not await closed_soon(r, 0.01) for r, _ in idle]
        for _, writer in idle:
            writer.close()
        return held, served, results, still_idle.count(True)

    with HonestTraffic(swarm[1], reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids) as honest:
        held, served, results, still_idle = asyncio.run(asyncio.wait_for(attack(), 120))
    honest.check()
    trickled, stalled, huge = results[:3], results[3:7], results[7:]
    assert held <= MAX_CONNECTIONS, held
    assert held >= MAX_CONNECTIONS // 2, held  # the rest were refused, not all
    assert served.peer_id == target["peer_id"]
    assert all(READ_TIMEOUT_S - 0.5 < t < READ_TIMEOUT_S + 4 for t in trickled), trickled
    assert all(t < READ_TIMEOUT_S + 4 for t in stalled), stalled
    assert all(isinstance(r, ErrorReply) and r.code == LimitExceeded.code for r in huge), huge
    assert still_idle <= held - 7  # newcomers took the places of quiet idle sockets
    growth = rss_bytes(target["pid"]) - rss_before
    assert growth < 64 * MiB, growth / MiB
    print(f"idle sockets held {held} of 200, {still_idle} left at the end; tricklers cut after "
          f"{max(trickled):.1f} s, stalled 48 MiB frames after {max(stalled):.1f} s; RSS growth "
          f"{growth / MiB:.0f} MiB; honest answers during it: {len(honest.answers)}")


def test_slowloris_by_declared_length_cannot_lock_new_connections_out(swarm, target, reference):
    """Every connection slot held by a socket that declares a large frame and trickles it:
    new connections are still admitted (a partial frame is no activity, the least recently
    active slot gives way), and every trickler is cut READ_TIMEOUT_S after its first byte,
    however large the frame it declared. Before: a partial frame was never evicted, and a
    64 MiB frame had READ_TIMEOUT_S + 64 s, so a handful of sockets locked the node out."""
    host, port, endpoint = target["host"], target["port"], target["endpoint"]
    declared = 2 * MiB  # under the target's frame limit (the largest step: ~2.1 MiB)

    async def trickler(first: bytes) -> float | None:
        """Seconds until the node closed it (None: still open after 3 x the timeout)."""
        reader, writer = await asyncio.open_connection(host, port)
        t0 = time.monotonic()
        try:
            writer.write(first)
            while time.monotonic() - t0 < 3 * READ_TIMEOUT_S:
                await asyncio.sleep(0.2)
                if await closed_soon(reader):
                    return time.monotonic() - t0
                writer.write(b"\0" * 64)
                await writer.drain()
        except ConnectionError:
            return time.monotonic() - t0
        finally:
            writer.close()
        return None

    async def newcomers() -> list[str]:
        """Info over fresh connections while the tricklers hold every slot."""
        await asyncio.sleep(0.5)
        peers = []
        for _ in range(6):
            peers.append((await info(endpoint)).peer_id)
            await asyncio.sleep(0.2)
        return peers

    async def huge_frame() -> object:
        """A 64 MiB declaration once the tricklers hold every slot (sent before them, it would
        be the oldest quiet slot, the first to give way to a trickler)."""
        await asyncio.sleep(0.5)
        return await exchange(host, port, (64 * MiB).to_bytes(4, "big"))

    async def attack():
        tricklers = [trickler(declared.to_bytes(4, "big")) for _ in range(MAX_CONNECTIONS)]
        return await asyncio.gather(newcomers(), huge_frame(), *tricklers)

    with HonestTraffic(swarm[1], reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids) as honest:
        peers, huge, *cut = asyncio.run(asyncio.wait_for(attack(), 120))
    honest.check()
    assert peers == [target["peer_id"]] * 6  # every newcomer was served
    assert isinstance(huge, ErrorReply) and huge.code == LimitExceeded.code  # refused at once
    assert all(t is not None and t < READ_TIMEOUT_S + 1.5 for t in cut), sorted(
        t or 99 for t in cut)[-5:]
    print(f"{len(cut)} tricklers of a {declared >> 20} MiB frame: all cut within "
          f"{max(cut):.1f} s; newcomers served: {len(peers)}; honest answers: {len(honest.answers)}")


def test_squatters_reserve_at_most_their_share_and_unstepped_sessions_expire(
    swarm, target, reference, smollm2_spec
):
    """Before: one OpenSession with max_length = the whole cache made the node answer 'busy'
    to everyone for the 5-minute idle timeout. Now a session may reserve SESSION_TOKENS, a
    connection CONNECTION_TOKENS, and reservations that never step go after
    FIRST_STEP_TIMEOUT_S."""
    local, client = swarm
    model_id, endpoint = smollm2_spec.model_id, target["endpoint"]
    spare = local.nodes[1]["peer_id"]

    async def squat(rpc: RpcClient, tag: str, count: int) -> list:
        return await asyncio.gather(*(
            rpc.call(OpenSession(0, f"{tag}-{i}", model_id, 0, 15, SESSION_TOKENS), 10.0)
            for i in range(count)), return_exceptions=True)

    async def free_after(deadline_s: float) -> tuple[int, float]:
        t0 = time.monotonic()
        while True:
            free = (await info(endpoint)).free_cache_tokens
            if free == SESSION_TOKENS or time.monotonic() - t0 > deadline_s:
                return free, time.monotonic() - t0
            await asyncio.sleep(0.5)

    async def attack():
        transport = TcpTransport()
        rpc = RpcClient(await transport.connect(endpoint))
        [whole] = await asyncio.gather(
            rpc.call(OpenSession(0, "all", model_id, 0, 15, MAX_CACHE_TOKENS), 10.0),
            return_exceptions=True)
        one = await squat(rpc, "one", 4)
        peers.ban(spare, "test: every honest route goes through the target")
        honest = await asyncio.to_thread(client.generate, PROMPT, PARAMS)  # beside the squat
        await rpc.close()  # its sessions go with its connection
        rpcs = [RpcClient(await transport.connect(endpoint)) for _ in range(3)]
        more = [await squat(r, f"more{i}", 2) for i, r in enumerate(rpcs)]
        full = (await info(endpoint)).free_cache_tokens  # several connections fill the cache
        free, waited = await free_after(3 * FIRST_STEP_TIMEOUT_S)  # connections still open
        peers.ban(spare, "test: every honest route goes through the target")  # bans last 3 s+
        after = await asyncio.to_thread(client.generate, PROMPT, PARAMS)
        for r in rpcs:
            await r.close()
        return whole, one, honest, more, full, free, waited, after

    peers = client.core.peers
    peers.unban(target["peer_id"])
    try:
        whole, one, honest, more, full, free, waited, after = asyncio.run(
            asyncio.wait_for(attack(), 150))
    finally:
        peers.unban(spare)
    assert isinstance(whole, LimitExceeded), whole
    assert [type(x).__name__ for x in one] == ["SessionOpened"] * 2 + ["PeerBusy"] * 2, one
    assert honest.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids and target["peer_id"] in [h.peer_id for h in honest.route]
    assert sum(isinstance(x, SessionOpened) for xs in more for x in xs) == 4 and full == 0, more
    assert free == SESSION_TOKENS, (free, waited)  # the unstepped reservations expired
    assert FIRST_STEP_TIMEOUT_S - 1 < waited < 2 * FIRST_STEP_TIMEOUT_S, waited
    assert after.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids and target["peer_id"] in [h.peer_id for h in after.route]
    print(f"squatter: whole cache refused, {CONNECTION_TOKENS} tokens on one connection, the "
          f"cache full over several; freed after {waited:.1f} s without a step")


def test_the_target_still_serves_a_route_through_it_and_logged_no_traceback(
    swarm, target, reference
):
    local, client = swarm
    peers = client.core.peers
    spare = local.nodes[1]["peer_id"]
    peers.unban(target["peer_id"])
    peers.ban(spare, "test: leave the target as the only node for 0:15")
    result = client.generate(PROMPT, PARAMS)
    assert result.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids
    assert target["peer_id"] in [h.peer_id for h in result.route] and not result.recoveries
    log = (local.state_dir / "node-0.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------- bench hostile


@pytest.fixture(scope="module")
def report(swarm):
    """``bench hostile``'s reduced run (tests/test_bench_hostile.py) on this module's swarm,
    after the attacks above (its fresh clients see T with its small limits: each attack
    reads what a node admits)."""
    from layerchain.bench.hostile import run_hostile_bench

    t0 = time.monotonic()
    out = run_hostile_bench(quick=True, attacks=IN_TEST, options=TEST_OPTIONS, swarm=swarm[0])
    print(f"bench hostile (test options) took {time.monotonic() - t0:.0f} s")
    for row in out["attacks"]:
        print(row["name"], row["blocked"], row["honest_tokens_per_s_ratio"], f"{row['seconds']} s",
              row["details"])
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_report_has_the_issues_json_shape(report):
    assert [row["name"] for row in report["attacks"]] == [a for a in ATTACKS if a in IN_TEST]
    for row in report["attacks"]:
        assert isinstance(row["blocked"], bool), row
        assert isinstance(row["honest_tokens_per_s_ratio"], float), row
        assert row["honest"]["generations"] >= 1, row  # the honest client ran meanwhile
    assert report["all_blocked"] == all(row["blocked"] for row in report["attacks"])
    assert report["baseline_tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_attack_reached_its_target(report):
    rows = {row["name"]: row for row in report["attacks"]}
    for name, row in rows.items():
        assert row["observed"], (name, row["details"])
    assert rows["forged_records"]["details"]["control_read_by_client"]
    assert rows["slow_liar"]["details"]["steps_relayed"] > 0
    assert any(rows["error_code_liars"]["details"]["requests_per_code"].values())
    assert len(rows["ban_poisoning"]["details"]["outcomes"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(BLOCKED_BY_NOW))
def test_landed_defences_block_their_attack(report, name):
    row = next(r for r in report["attacks"] if r["name"] == name)
    assert row["blocked"], row
