"""Benchmark: the floor of a hop on this machine (issue 16), ``layerchain bench floor``.

What does a hop cost when nothing but the processes and the kernel are in the way? Three
"node" processes and a "client" pass a decode step's hidden state ([hidden] float32: 2.3 KB
for SmolLM2) to each other over loopback TCP: blocking sockets, no asyncio, no TLS, no
codec, no receipt or voucher. Between two messages each node streams ``node_mb`` MB of
float32 weights (``torch.mv``, one thread: 142 MB is SmolLM2's 10 fp32 blocks) and the
client ``head_mb`` (113 MB: its LM head), so every process runs with the caches a real
hop finds after a forward: evicted. Two topologies, alternating rounds in one run so that
both see the same machine:

* ``pull``: the client sends to each node in turn and waits for its answer (what
  ``InferenceSession`` does in pull mode): 2 handoffs per hop, 6 per token;
* ``push``: client -> node 0 -> node 1 -> node 2 -> client: 4 handoffs per token.

``wire_ms_per_hop`` = (token time - every process's compute) / 3, the same arithmetic as
``bench --json``'s ``wire_ms_per_hop_p50`` (``bench.swarm.split_figures``): what a real
swarm's hop costs beyond this floor is its protocol (asyncio, TLS, codec, signatures,
checks); what the floor itself costs is the machine (a sleeping process woken on a
virtual CPU, cold caches).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import statistics
import struct
import time
from typing import Any

import torch

from layerchain.errors import ConfigError, PeerUnreachable

HIDDEN = 576  # SmolLM2's hidden size: a decode step carries 576 float32
_HEADER = struct.Struct("<I")  # the token's index
_TRAILER = struct.Struct("<d")  # compute seconds so far, summed along the chain
HOPS = 3


def _frame_bytes(hidden: int) -> int:
    return _HEADER.size + 4 * hidden + _TRAILER.size


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _weights(mb: float, hidden: int) -> torch.Tensor:
    rows = max(hidden, int(mb * 1e6 / 4 / hidden))
    return torch.randn(rows, hidden) * hidden ** -0.5


def _apply(weights: torch.Tensor, frame: bytes, hidden: int) -> tuple[bytes, float]:
    """The frame's hidden state through ``weights`` (the first ``hidden`` rows kept), and
    the seconds that took."""
    x = torch.frombuffer(bytearray(frame[_HEADER.size:_HEADER.size + 4 * hidden]),
                         dtype=torch.float32)
    t0 = time.perf_counter()
    y = torch.mv(weights, x)[:hidden]
    y = y / (y.norm() + 1e-6)  # bounded values, step after step
    return y.numpy().tobytes(), time.perf_counter() - t0


def _listen() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server, server.getsockname()[1]


def _dial(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _node(ports: Any, next_port: int, mb: float, hidden: int) -> None:
    """One node: answers (pull, ``next_port`` 0) or forwards (push) every frame it reads."""
    torch.set_num_threads(1)
    weights = _weights(mb, hidden)
    server, port = _listen()
    ports.put(port)
    onward = _dial(next_port) if next_port else None
    conn, _ = server.accept()
    server.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = _frame_bytes(hidden)
    with conn:
        while (frame := _recv_exact(conn, size)) is not None:
            y, seconds = _apply(weights, frame, hidden)
            spent = _TRAILER.unpack_from(frame, size - _TRAILER.size)[0] + seconds
            (onward or conn).sendall(frame[:_HEADER.size] + y + _TRAILER.pack(spent))
    if onward is not None:
        onward.close()


def _round(mode: str, tokens: int, node_mb: float, head: torch.Tensor,
           hidden: int) -> list[tuple[float, float]]:
    """One swarm of 3 node processes in ``mode``: (token seconds, compute seconds) of every
    token after the first two."""
    ctx = mp.get_context("spawn")
    ports: Any = ctx.Queue()
    procs: list[Any] = []
    back_server = None
    socks: list[socket.socket] = []
    try:
        next_port = 0
        if mode == "push":  # started last to first: each dials the next at its start
            back_server, next_port = _listen()
        order = []
        for _ in range(HOPS):
            proc = ctx.Process(target=_node, args=(ports, next_port, node_mb, hidden),
                               daemon=True)
            proc.start()
            procs.append(proc)
            try:
                port = ports.get(timeout=120)
            except queue.Empty:
                raise PeerUnreachable("a floor node did not start within 120 s") from None
            order.append(port)
            if mode == "push":
                next_port = port
        if mode == "push":
            order.reverse()  # node 0 is the one started last
        socks = [_dial(p) for p in (order if mode == "pull" else order[:1])]
        if back_server is None:  # pull: to each node and back in turn
            legs = [(sock, sock) for sock in socks]
        else:  # push: to node 0, back from the last
            back, _ = back_server.accept()
            back.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(back)
            legs = [(socks[0], back)]
        return _decode(tokens, legs, head, hidden)
    finally:
        for sock in socks:
            sock.close()
        if back_server is not None:
            back_server.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _decode(tokens: int, legs: list[tuple[socket.socket, socket.socket]], head: torch.Tensor,
            hidden: int) -> list[tuple[float, float]]:
    """``tokens`` tokens, each sent and read back along ``legs`` (socket to send on, socket
    to read the answer from), then through the client's ``head``."""
    size = _frame_bytes(hidden)
    y = torch.randn(hidden).numpy().tobytes()
    out = []
    for i in range(tokens):
        t0 = time.perf_counter()
        frame = _HEADER.pack(i) + y + _TRAILER.pack(0.0)
        for sock, reply in legs:
            try:
                sock.sendall(frame)
                answer = _recv_exact(reply, size)
            except OSError as error:
                raise PeerUnreachable(f"a floor node's connection broke: {error}") from error
            if answer is None:
                raise PeerUnreachable("a floor node closed its connection (see its error above)")
            frame = answer
        y, seconds = _apply(head, frame, hidden)  # the client's LM head
        spent = _TRAILER.unpack_from(frame, size - _TRAILER.size)[0] + seconds
        if i >= 2:  # the first tokens connect and fault pages in
            out.append((time.perf_counter() - t0, spent))
    return out


def run_floor_bench(tokens: int = 64, rounds: int = 2, node_mb: float = 142.0,
                    head_mb: float = 113.0, hidden: int = HIDDEN) -> dict:
    """``rounds`` rounds of pull then push, ``tokens`` tokens each (see the module
    docstring); medians over every token of a mode's rounds."""
    if tokens < 3 or rounds < 1 or node_mb <= 0 or head_mb <= 0 or hidden < 1:
        raise ConfigError("bench floor needs --tokens >= 3, --rounds >= 1, --node-mb and "
                          "--head-mb > 0")
    torch.set_num_threads(1)
    head = _weights(head_mb, hidden)
    samples: dict[str, list[tuple[float, float]]] = {"pull": [], "push": []}
    for _ in range(rounds):
        for mode in samples:
            samples[mode] += _round(mode, tokens, node_mb, head, hidden)
    points = []
    for mode, rows in samples.items():
        wire = [1000.0 * (total - spent) / HOPS for total, spent in rows]
        points.append({
            "mode": mode,
            "handoffs_per_token": 2 * HOPS if mode == "pull" else HOPS + 1,
            "wire_ms_per_hop_p50": round(statistics.median(wire), 3),
            "wire_ms_per_hop_min": round(min(wire), 3),
            "token_ms_p50": round(1000.0 * statistics.median(t for t, _ in rows), 3),
            "compute_ms_p50": round(1000.0 * statistics.median(s for _, s in rows), 3),
        })
    return {"points": points, "hops": HOPS, "tokens": tokens, "rounds": rounds,
            "node_mb": node_mb, "head_mb": head_mb, "frame_bytes": _frame_bytes(hidden),
            "transport": "tcp, blocking sockets, no TLS/asyncio/codec/signatures"}
