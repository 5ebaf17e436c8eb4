"""Emulated hosts on one machine: network namespaces, bridges, routers, NAT and delay lines.

A ``Lab`` builds a topology of Linux network namespaces (each one a "host" with its own
addresses, routes and firewall) and tears it down by name, even when the code using it
fails. Every name it creates starts with a random per-run tag (``lc3f2a-``), so parallel
runs and leftovers never collide, and every address it uses (10.199.K.0/24) lives only inside
namespaces it created: nothing is added to the machine's own network namespace.

::

    lab = Lab.create()                      # needs root, iproute2 and iptables
    lab.add_router("r")                     # a namespace that forwards between its subnets
    lab.add_subnet("lan", router="r", hosts=["lan1", "lan2"])   # a bridge in "r", veths
    lab.add_subnet("far", router="r", hosts=["far1"])
    lab.add_nat("nat", upstream="far", hosts=["home1"])          # masquerade, no way in
    lab.set_delay("r", rtt_ms=20, between=("lan", "far"))        # a delay line on "r"
    proc = lab.popen("lan1", [sys.executable, "-m", "layerchain", "node", "start", ...])
    lab.close()                             # kills what it started, deletes the namespaces

Latency: this kernel has no ``tc netem``, so a **delay line** does it: the router's
``FORWARD`` chain sends the chosen packets to an NFQUEUE, and a small process in the router
namespace (``python -m layerchain.bench.netlab delay``, NetfilterQueue bindings) holds each
one for half the round trip before its verdict. Packets keep their order (one constant delay
per queue); nothing else about them changes. Accuracy: about +0.3 ms on a 20 ms round trip on
an idle machine (``tests/test_multihost_e2e.py`` measures it with TCP echoes every run).

The module also runs the pieces that must live *inside* a host (``python -m
layerchain.bench.netlab delay|client|echo|ping``): see ``main``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import json
import logging
import os
import queue
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from layerchain.errors import ConfigError, LayerchainError

SUBNET_PREFIX = "10.199"  # every lab address is 10.199.K.H, only inside the lab's namespaces
ROUTER_HOST = 1  # a subnet's router (its bridge) is .1; hosts are .11, .12, ...
FIRST_HOST = 11
_IFNAME_MAX = 15  # Linux interface names: at most 15 bytes
_DELAY_EARLY_S = 0.0002  # the delay line sleeps until 0.2 ms before a packet is due, then polls
_PR_SET_TIMERSLACK = 29  # prctl: 1 ns timer slack, so sleeps end when asked (default 50 us)
_RT_PRIORITY = 10  # SCHED_FIFO priority of the delay line and the RTT probes (1..99)
_SO_ORIGINAL_DST = 80  # getsockopt (SOL_IP): a REDIRECTed connection's destination


class LabError(LayerchainError):
    """A lab command failed (an ``ip``/``iptables`` call, a process in a host)."""

    code = "lab_error"


def unavailable() -> str | None:
    """Why namespaces can't be built here (None: they can): not root, or a tool is missing.

    Tests skip with this reason; ``bench rtt`` raises it as a ``ConfigError``."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces): run as root, as CI does"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"emulated hosts need `{tool}`: `apt-get install {package}` (make install does)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return ("emulated hosts need the NetfilterQueue bindings for their delay line: "
                "`make install` (libnetfilter-queue-dev, then pip install netfilterqueue)")
    probe = f"lcprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine can't create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(argv: Sequence[str], *, input: str | None = None) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    """One emulated host: a namespace with one address on one subnet."""

    name: str  # the lab's name for it, e.g. "lan1"
    netns: str  # the namespace, e.g. "lc3f2a-lan1"
    address: str  # its IPv4 address, e.g. "10.199.1.11"
    subnet: str  # the subnet it sits on, e.g. "lan"


@dataclass(frozen=True)
class Subnet:
    """A /24 behind one router: a bridge in the router's namespace, hosts on veth pairs."""

    name: str
    router: str  # the router's name (its namespace is lab.netns(router))
    index: int  # the K of 10.199.K.0/24
    bridge: str  # the bridge's interface name inside the router's namespace

    @property
    def cidr(self) -> str:
        return f"{SUBNET_PREFIX}.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        return f"{SUBNET_PREFIX}.{self.index}.{ROUTER_HOST}"


@dataclass
class DelayLine:
    """A delay line process on a router: holds each queued packet for ``one_way_ms``."""

    router: str
    queue: int
    proc: subprocess.Popen[str]
    one_way_ms: float
    rules: list[list[str]] = field(default_factory=list)  # iptables rule specs (FORWARD)

    def set(self, one_way_ms: float) -> None:
        """Change the delay of packets queued from now on (the process acknowledges)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{one_way_ms}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("delay "):
            raise LabError(f"delay line on {self.router} did not take {one_way_ms} ms: {line!r}")
        self.one_way_ms = one_way_ms


class Lab:
    """A set of namespaces with one random tag; ``close`` (also at exit) removes them all."""

    def __init__(self, tag: str, workdir: Path) -> None:
        self.tag = tag
        self.workdir = workdir  # logs of the processes started in hosts
        self.hosts: dict[str, Host] = {}
        self.subnets: dict[str, Subnet] = {}
        self.routers: list[str] = []
        self._namespaces: list[str] = []
        self._delays: dict[str, DelayLine] = {}  # router -> its delay line
        self._procs: list[subprocess.Popen[str]] = []
        self._closed = False
        atexit.register(self.close)

    @classmethod
    def create(cls, workdir: Path | None = None) -> Lab:
        """An empty lab; raises ``ConfigError`` saying why when namespaces can't be built."""
        reason = unavailable()
        if reason:
            raise ConfigError(reason)
        tag = f"lc{secrets.token_hex(2)}"
        if workdir is None:
            workdir = Path("/tmp") / f"{tag}-lab"
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(tag, workdir)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building -------------------------------------------------------------------------

    def netns(self, name: str) -> str:
        """The namespace of host or router ``name``."""
        return f"{self.tag}-{name}"

    def _add_netns(self, name: str) -> str:
        ns = self.netns(name)
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def add_router(self, name: str) -> None:
        """A namespace that forwards IPv4 between the subnets added to it."""
        ns = self._add_netns(name)
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # bridged frames (host to host on one subnet) stay out of iptables: only routed
        # packets meet the delay line and the NAT
        with contextlib.suppress(LabError):
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                  "net.bridge.bridge-nf-call-iptables=0"])
        self.routers.append(name)

    def add_subnet(self, name: str, *, router: str, hosts: Sequence[str]) -> list[Host]:
        """A /24 on a new bridge in ``router`` with ``hosts`` (new namespaces) on it."""
        if router not in self.routers:
            raise LabError(f"no router {router!r} in this lab")
        subnet = Subnet(name, router, len(self.subnets) + 1, f"br-{name}"[:_IFNAME_MAX])
        ns = self.netns(router)
        _run(["ip", "-n", ns, "link", "add", subnet.bridge, "type", "bridge"])
        _run(["ip", "-n", ns, "addr", "add", f"{subnet.gateway}/24", "dev", subnet.bridge])
        _run(["ip", "-n", ns, "link", "set", subnet.bridge, "up"])
        self.subnets[name] = subnet
        return [self._attach(host, subnet) for host in hosts]

    def _attach(self, name: str, subnet: Subnet, *, ns: str | None = None) -> Host:
        """Plug host ``name`` (a new namespace, or ``ns``) into ``subnet`` as eth-<subnet>."""
        if name in self.hosts:
            raise LabError(f"host {name!r} exists already")
        address = f"{SUBNET_PREFIX}.{subnet.index}.{FIRST_HOST + self._count_on(subnet.name)}"
        ns = ns or self._add_netns(name)
        inside = f"eth-{subnet.name}"[:_IFNAME_MAX]
        port = f"v-{name}"[:_IFNAME_MAX]
        rns = self.netns(subnet.router)
        _run(["ip", "-n", ns, "link", "add", inside, "type", "veth", "peer", "name", port,
              "netns", rns])
        _run(["ip", "-n", rns, "link", "set", port, "master", subnet.bridge])
        _run(["ip", "-n", rns, "link", "set", port, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside])
        _run(["ip", "-n", ns, "link", "set", inside, "up"])
        host = Host(name, ns, address, subnet.name)
        self.hosts[name] = host
        return host

    def _count_on(self, subnet: str) -> int:
        return sum(1 for h in self.hosts.values() if h.subnet == subnet)

    def add_default_routes(self) -> None:
        """Every host routes through its subnet's router (call once the subnets are built)."""
        for host in self.hosts.values():
            subnet = self.subnets[host.subnet]
            if host.name in self.routers:  # a NAT router: its default is set by add_nat
                continue
            _run(["ip", "-n", host.netns, "route", "replace", "default", "via", subnet.gateway])

    def add_nat(self, name: str, *, upstream: str, hosts: Sequence[str]) -> list[Host]:
        """A home router ``name``: a host on ``upstream`` that masquerades a private subnet
        of ``hosts`` behind it. Nothing outside can open a connection to those hosts (no
        route leads to their subnet and the NAT forwards only replies inward)."""
        up = self.subnets[upstream]
        ns = self._add_netns(name)
        self.routers.append(name)
        wan = self._attach(name, up, ns=ns)
        _run(["ip", "-n", ns, "route", "replace", "default", "via", up.gateway])
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        with contextlib.suppress(LabError):
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                  "net.bridge.bridge-nf-call-iptables=0"])
        inside = self.add_subnet(f"{name}-in", router=name, hosts=hosts)
        wan_if = f"eth-{upstream}"[:_IFNAME_MAX]
        ipt = ["ip", "netns", "exec", ns, "iptables"]
        _run([*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", wan_if, "-j", "MASQUERADE"])
        _run([*ipt, "-P", "FORWARD", "DROP"])
        _run([*ipt, "-A", "FORWARD", "-i", wan_if, "-m", "conntrack", "--ctstate",
              "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        _run([*ipt, "-A", "FORWARD", "-o", wan_if, "-j", "ACCEPT"])
        for host in inside:
            _run(["ip", "-n", host.netns, "route", "replace", "default",
                  "via", self.subnets[f"{name}-in"].gateway])
        del wan
        return inside

    # -- latency --------------------------------------------------------------------------

    def set_delay(self, router: str, rtt_ms: float,
                  between: tuple[str, str] | None = None) -> None:
        """Add ``rtt_ms`` to the round trip of every connection ``router`` forwards (or only
        those between subnets ``between``): each packet waits ``rtt_ms / 2`` in the router.

        The first call starts the router's delay line; later calls change its delay (the
        packets it selects stay as first chosen). 0 stops delaying without removing it."""
        one_way = rtt_ms / 2.0
        line = self._delays.get(router)
        if line is not None:
            line.set(one_way)
            return
        if rtt_ms == 0:
            return
        ns = self.netns(router)
        queue = len(self._delays)
        with open(self.workdir / f"delay-{router}.log", "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "layerchain.bench.netlab",
                 "delay", "--queue", str(queue), "--one-way-ms", str(one_way)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True, start_new_session=True,
            )
        self._procs.append(proc)
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready.startswith("ready"):
            raise LabError(f"the delay line on {router} did not start: "
                           f"{(self.workdir / f'delay-{router}.log').read_text()[-400:]}")
        line = DelayLine(router, queue, proc, one_way)
        pairs = ([(self.subnets[between[0]].cidr, self.subnets[between[1]].cidr),
                  (self.subnets[between[1]].cidr, self.subnets[between[0]].cidr)]
                 if between else [("0.0.0.0/0", "0.0.0.0/0")])
        for src, dst in pairs:
            rule = ["FORWARD", "-s", src, "-d", dst, "-j", "NFQUEUE", "--queue-num", str(queue)]
            _run(["ip", "netns", "exec", ns, "iptables", "-I", *rule])
            line.rules.append(rule)
        self._delays[router] = line

    # -- processes in hosts ---------------------------------------------------------------

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], *, log: Path | None = None,
              env: dict[str, str] | None = None, pipes: bool = False) -> subprocess.Popen[str]:
        """Start ``argv`` in ``host`` in its own process group (its pid is the program's own:
        ``ip netns exec`` execs it); the lab kills its group on close. Output goes to ``log``
        (default WORKDIR/HOST-N.log), or to pipes with ``pipes``."""
        if pipes:
            out: int | IO[bytes] = subprocess.PIPE
        else:
            out = open(log or self.workdir / f"{host}-{len(self._procs)}.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                self.exec_argv(host, argv), stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT if not pipes else subprocess.PIPE,
                text=True, start_new_session=True, env=env,
            )
        finally:
            if not pipes and not isinstance(out, int):
                out.close()
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout_s: float = 60.0) -> str:
        """Run ``argv`` in ``host`` to completion; return its stdout (``LabError`` if it fails)."""
        done = subprocess.run(self.exec_argv(host, argv), capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            raise LabError(f"{argv[0]} in {host} failed: {done.stderr.strip()[-400:]}")
        return done.stdout

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process started in the lab, then delete its namespaces (by name).

        Safe to call twice, and called at exit; errors are ignored (best effort)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for ns in reversed(self._namespaces):
            # any process still inside (one we did not start) would keep the namespace
            # alive once unnamed: kill those first
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        atexit.unregister(self.close)


def tcp_rtt_ms(lab: Lab, client: str, server: str, samples: int = 40) -> dict[str, float]:
    """Round trips of one byte over TCP from ``client`` to ``server`` (NODELAY): p10/p50/p90 ms."""
    port = 9000 + secrets.randbelow(1000)
    echo = lab.popen(server, [sys.executable, "-m", "layerchain.bench.netlab", "echo",
                              "--host", lab.hosts[server].address, "--port", str(port)],
                     pipes=True)
    try:
        assert echo.stdout is not None
        if not echo.stdout.readline().startswith("ready"):
            raise LabError(f"the echo server in {server} did not start")
        out = lab.run(client, [sys.executable, "-m", "layerchain.bench.netlab", "ping",
                               "--host", lab.hosts[server].address, "--port", str(port),
                               "--samples", str(samples)])
    finally:
        echo.kill()
        echo.wait()
        for pipe in (echo.stdin, echo.stdout, echo.stderr):
            if pipe is not None:
                pipe.close()
    result: dict[str, float] = json.loads(out)
    return result


@dataclass(frozen=True)
class LabNode:
    """A node process on an emulated host: ``info`` is its node.json (peer_id, endpoint...)."""

    host: str
    name: str
    proc: subprocess.Popen[str]
    data_dir: Path
    info: dict[str, object]

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])


def start_bootstrap(lab: Lab, host: str, *, listen: str = "0.0.0.0",
                    timeout_s: float = 60.0) -> list[str]:
    """A DHT bootstrap on ``host`` listening on ``listen``; return the multiaddrs it prints."""
    addr_file = lab.workdir / f"bootstrap-{host}.addrs"
    addr_file.unlink(missing_ok=True)
    proc = lab.popen(host, [sys.executable, "-m", "layerchain.discovery.bootstrap",
                            "--host", listen, "--port", "0",
                            "--print-addresses-to", str(addr_file)],
                     log=lab.workdir / f"bootstrap-{host}.log")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if addr_file.exists() and addr_file.read_text().strip():
            return addr_file.read_text().split()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    log = (lab.workdir / f"bootstrap-{host}.log").read_text(errors="replace")[-600:]
    raise LabError(f"the DHT bootstrap on {host} did not start: {log}")


def start_node(lab: Lab, host: str, name: str, blocks: str, initial_peers: Sequence[str], *,
               model: str = "smollm2", listen: str = "0.0.0.0",
               extra_args: Sequence[str] = (), threads: int = 1) -> tuple[subprocess.Popen[str], Path]:
    """Start ``layerchain node start`` on ``host`` serving ``blocks`` ("START:END"); it
    listens on ``listen`` (all interfaces by default, as a person would start it: the node
    picks the addresses to announce). Returns the process and its data dir; ``wait_node``
    waits for it to serve."""
    from layerchain.local import node_env

    data_dir = lab.workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "layerchain", "node", "start", "--model", model,
            "--blocks", blocks, "--host", listen,
            "--data-dir", str(data_dir), "--threads", str(threads),
            *[arg for peer in initial_peers for arg in ("--initial-peers", peer)], *extra_args]
    proc = lab.popen(host, argv, log=lab.workdir / f"{name}.log", env=node_env(threads))
    return proc, data_dir


def wait_node(lab: Lab, host: str, name: str, proc: subprocess.Popen[str], data_dir: Path,
              timeout_s: float = 240.0) -> LabNode:
    """Wait until the node started by ``start_node`` serves (its node.json appears)."""
    from layerchain.local import wait_ready

    info = wait_ready(proc, data_dir, lab.workdir / f"{name}.log", timeout_s)
    full = json.loads((data_dir / "node.json").read_text())
    return LabNode(host, name, proc, data_dir, {**full, **info})


def intercept(lab: Lab, router: str, victim: LabNode, port: int) -> None:
    """Send every connection ``router`` forwards to ``victim``'s endpoint to a man in the
    middle on ``router`` (``mitm`` below): it answers TLS with a key of its own and relays
    to the victim. Remove with ``lab.close`` (the router goes)."""
    address, victim_port = str(victim.info["endpoint"]).split("://", 1)[1].rsplit(":", 1)
    lab.popen(router, [sys.executable, "-m", "layerchain.bench.netlab", "mitm",
                       "--port", str(port)], log=lab.workdir / f"mitm-{router}.log")
    time.sleep(1.0)  # the listener is up well before this (a fresh key, a socket)
    _run(["ip", "netns", "exec", lab.netns(router), "iptables", "-t", "nat", "-A", "PREROUTING",
          "-p", "tcp", "-d", address, "--dport", victim_port, "-j", "REDIRECT",
          "--to-ports", str(port)])


# -- the pieces that run inside a host (python -m layerchain.bench.netlab ...) --------------


def _first_in_line() -> None:
    """Run under the real-time scheduler (root; else the highest nice priority): on a loaded
    machine a packet's verdict, or an echo, must not wait behind the nodes' matrix products.
    Safe: these processes sleep between packets (the delay line polls 0.2 ms at most per
    packet), and the kernel caps real-time tasks at 95% of each second anyway."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_RT_PRIORITY))
    except OSError:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, -20)


def _delay_main(queue: int, one_way_ms: float) -> None:
    """NFQUEUE ``queue``: accept each packet ``one_way_ms`` after it arrived, in order.

    stdin: a new delay (ms) per line, acknowledged with ``delay MS`` on stdout. One thread,
    one loop: sleep until the next packet is due (or a packet or a line arrives), then poll
    the last 0.2 ms so a verdict is not late by the kernel's wake-up slack."""
    from netfilterqueue import COPY_META, NetfilterQueue, Packet

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    _first_in_line()
    delay_s = one_way_ms / 1000.0
    held: collections.deque[tuple[float, Packet]] = collections.deque()  # (due, packet)

    def hold(packet: Packet) -> None:
        held.append((time.monotonic() + delay_s, packet))

    nfq = NetfilterQueue()
    nfq.bind(queue, hold, mode=COPY_META, range=0)  # only the id: no payload copied
    fd = nfq.get_fd()
    stdin = sys.stdin.fileno()
    print("ready", flush=True)
    try:
        while True:
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()
            wait = held[0][0] - time.monotonic() - _DELAY_EARLY_S if held else 1.0
            ready, _, _ = select.select([fd, stdin], [], [], max(0.0, wait))
            if fd in ready:
                nfq.run(block=False)
            if stdin in ready:
                line = sys.stdin.readline()
                if not line:
                    break  # the lab went away
                delay_s = float(line) / 1000.0
                print(f"delay {line.strip()}", flush=True)
    finally:
        for _, packet in held:
            packet.accept()
        nfq.unbind()


def _echo_main(host: str, port: int) -> None:
    _first_in_line()
    with socket.create_server((host, port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(64):
                conn.sendall(data)


def _ping_main(host: str, port: int, samples: int) -> None:
    _first_in_line()
    with socket.create_connection((host, port), timeout=10.0) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times: list[float] = []
        for _ in range(samples):
            start = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(64)
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    q = statistics.quantiles(times, n=10)
    print(json.dumps({"p10": q[0], "p50": statistics.median(times), "p90": q[-1]}))


def _original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a connection REDIRECTed by iptables was going (SO_ORIGINAL_DST)."""
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


def _mitm_main(port: int) -> None:
    """A man in the middle: accept TLS with a fresh key of its own (it lacks the node's), open
    TLS to where each connection was going, and relay the plaintext both ways. A client that
    checks the peer id refuses it at the handshake; one that did not would be read."""
    import asyncio

    from layerchain.discovery.identity import Identity
    from layerchain.wire.tls import client_context, server_context

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, dport = _original_destination(writer.get_extra_info("socket"))
        print(f"intercepted a connection to {host}:{dport}", flush=True)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, dport, ssl=client_context())
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def serve() -> None:
        server = await asyncio.start_server(relay, "0.0.0.0", port,
                                            ssl=server_context(Identity.generate()))
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


class _Warnings(logging.Handler):
    """Collects the client's warnings (bans and their reasons) for the current request."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _client_main(initial_peers: list[str], options: dict[str, object]) -> None:
    """A client on an emulated host, driven through stdin/stdout with one JSON per line.

    Request: ``{"prompt", "max_new_tokens", "model"?, "ban"?: [peer_id], "events"?: bool,
    "pause_at"?: int}``. Replies: ``{"event": "token", "index", "route": [peer_id]}`` per
    token when ``events`` (after the one of index ``pause_at`` the generation waits for a
    line ``go``: nothing runs meanwhile, so a test can act between two steps),
    then ``{"event": "result", "token_ids", "text", "route", "recoveries": [{"peer_id",
    "reason"}], "tokens_per_s", "ttft_s", "warnings"}`` or ``{"event": "error", "type",
    "message", "warnings"}``. One ``Swarm`` per model, kept for later requests."""
    from layerchain.client import Swarm
    from layerchain.model import SamplingParams

    warnings = _Warnings()
    logging.getLogger("layerchain").addHandler(warnings)
    swarms: dict[str, Swarm] = {}

    def reply(obj: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"event": "ready"})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            warnings.lines = []
            try:
                model = str(request.get("model", "smollm2"))
                if model not in swarms:
                    swarms[model] = Swarm(initial_peers, model=model, **options)
                swarm = swarms[model]
                for peer_id in request.get("ban", []):
                    swarm.core.peers.ban(peer_id, "the lab's request")
                params = SamplingParams(max_new_tokens=int(request["max_new_tokens"]))
                gen = swarm.stream(request["prompt"], params)
                for event in gen:
                    if request.get("events"):
                        reply({"event": "token", "index": event.index,
                               "route": [hop.peer_id for hop in gen.route]})
                    if event.index == request.get("pause_at"):
                        sys.stdin.readline()  # "go": the next step runs only now
                res = gen.result
                reply({
                    "event": "result", "token_ids": list(res.token_ids), "text": res.text,
                    "route": [hop.peer_id for hop in res.route],
                    "recoveries": [{"peer_id": r.peer_id, "reason": r.reason}
                                   for r in res.recoveries],
                    "tokens_per_s": res.tokens_per_s, "ttft_s": res.ttft_s,
                    "warnings": warnings.lines,
                })
            except LayerchainError as error:
                reply({"event": "error", "type": type(error).__name__, "message": str(error),
                       "warnings": warnings.lines})
    finally:
        for swarm in swarms.values():
            swarm.close()


class RemoteClient:
    """A ``Swarm`` client living in an emulated host (``_client_main`` in a child process)."""

    def __init__(self, lab: Lab, host: str, initial_peers: Sequence[str],
                 options: dict[str, object] | None = None, ready_timeout_s: float = 120.0) -> None:
        self.host = host
        self._log = lab.workdir / f"client-{host}.log"
        argv = [sys.executable, "-m", "layerchain.bench.netlab", "client",
                "--options", json.dumps(options or {}),
                *[arg for peer in initial_peers for arg in ("--initial-peers", peer)]]
        self.proc = lab.popen(host, argv, pipes=True)
        self._lines: queue.Queue[str] = queue.Queue()  # its stdout, line by line ("" at EOF)
        self._stderr = open(self._log, "ab")  # noqa: SIM115
        self._pump()
        first = self._read(ready_timeout_s)
        if first.get("event") != "ready":
            raise LabError(f"the client in {host} did not start: {first}")

    def _pump(self) -> None:
        """Threads that move the child's stdout into a queue (select on a buffered pipe
        would miss lines already read ahead) and its stderr into the log."""

        def out() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._lines.put(line)
            self._lines.put("")

        def err() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self._stderr.write(line.encode())
                self._stderr.flush()

        for target in (out, err):
            threading.Thread(target=target, daemon=True).start()

    def _read(self, timeout_s: float) -> dict[str, object]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            line = ""
        if not line:
            raise LabError(f"the client in {self.host} said nothing in {timeout_s:.0f} s "
                           f"(exit {self.proc.poll()}); see {self._log}")
        reply: dict[str, object] = json.loads(line)
        return reply

    def stream(self, prompt: str, max_new_tokens: int, *, model: str = "smollm2",
               ban: Sequence[str] = (), pause_at: int | None = None,
               timeout_s: float = 300.0) -> Iterator[dict[str, object]]:
        """Send one request; yield its token events, then its result or error (last). With
        ``pause_at``, the generation stops after that token until ``resume``."""
        self._send(json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens,
                               "model": model, "ban": list(ban), "events": True,
                               "pause_at": pause_at}))
        while True:
            event = self._read(timeout_s)
            yield event
            if event["event"] in ("result", "error"):
                return

    def resume(self) -> None:
        """Let a generation paused at ``pause_at`` go on."""
        self._send("go")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def generate(self, prompt: str, max_new_tokens: int, **kwargs: object) -> dict[str, object]:
        """The result (or error) event of one request."""
        events = list(self.stream(prompt, max_new_tokens, **kwargs))  # type: ignore[arg-type]
        return events[-1]

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._stderr.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m layerchain.bench.netlab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    delay = sub.add_parser("delay", help="a delay line on an NFQUEUE (in a router)")
    delay.add_argument("--queue", type=int, default=0)
    delay.add_argument("--one-way-ms", type=float, required=True)
    echo = sub.add_parser("echo", help="a one-connection TCP echo server")
    ping = sub.add_parser("ping", help="TCP round trips to an echo server (JSON p10/p50/p90 ms)")
    for cmd in (echo, ping):
        cmd.add_argument("--host", required=True)
        cmd.add_argument("--port", type=int, required=True)
    ping.add_argument("--samples", type=int, default=40)
    mitm = sub.add_parser("mitm", help="a TLS man in the middle for REDIRECTed connections")
    mitm.add_argument("--port", type=int, required=True)
    client = sub.add_parser("client", help="a swarm client driven by JSON lines on stdin")
    client.add_argument("--initial-peers", action="append", default=[])
    client.add_argument("--options", default="{}", help="ClientConfig fields, as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "delay":
        _delay_main(args.queue, args.one_way_ms)
    elif args.cmd == "echo":
        _echo_main(args.host, args.port)
    elif args.cmd == "ping":
        _ping_main(args.host, args.port, args.samples)
    elif args.cmd == "mitm":
        _mitm_main(args.port)
    else:
        _client_main(args.initial_peers, json.loads(args.options))


if __name__ == "__main__":
    main()
