"""hivemind's training stack on the swarm's own DHT: a ``hivemind.DHT`` face over a
``HivemindDiscovery``.

``hivemind.Optimizer`` (and its averagers and progress tracker) talk to a ``hivemind.DHT``:
an object whose ``get``/``store``/``run_coroutine`` send requests through a pipe to the
process that runs the ``DHTNode``, and whose ``replicate_p2p`` gives a forked averager a
second client of the same p2pd. layerchain runs its ``DHTNode`` in-process, on a thread of
its own (``discovery.dht``). ``SharedDHT`` is a ``hivemind.DHT`` that starts no process:
``attach`` points it at a discovery's node and serves hivemind's pipe protocol as a task on
the discovery's DHT thread. So the trainer joins the swarm through ``--initial-peers`` like
any client, and the optimizer's matchmaking keys, progress reports and averaging streams use
that very DHT node and p2pd; the averager processes hivemind forks reach it through the pipe,
as they would reach a ``hivemind.DHT`` child.

Validation. A layerchain DHT node accepts only signed peer records (``discovery.validator``);
hivemind's training entries are sub-keyed by a libp2p peer id or an RSA owner key. The
trainer's node accepts both (``TrainingEntryValidator``; ``training_entry_is_valid`` is the
pure rule: a bytes sub-key of at most ``MAX_TRAINING_SUBKEY_BYTES``, a value of at most
``MAX_TRAINING_VALUE_BYTES``, expiring within ``MAX_RECORD_TTL_S``, never a regular value, so
no block key's dictionary can be replaced). Serving nodes keep refusing training entries, so
the entries live on the trainers' own DHT nodes (hivemind stores on the nearest nodes that
accept, among its beam); in a swarm much larger than ``num_replicas`` + the trainers, nodes
should run this rule too (a change to ``discovery.validator`` left to its owner).
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import layerchain.discovery._hivemind  # noqa: F401 - first: hivemind's own __init__ stays lazy
from hivemind.dht.dht import DHT
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from layerchain.discovery.records import MAX_RECORD_TTL_S
from layerchain.discovery.validator import entry_is_valid

if TYPE_CHECKING:
    from layerchain.discovery.dht import HivemindDiscovery

MAX_TRAINING_SUBKEY_BYTES = 1024  # an RSA-2048 owner marker is ~400 bytes, a peer id ~40
MAX_TRAINING_VALUE_BYTES = 4096  # a signed progress report is ~400 bytes
CLOCK_SLACK_S = 30.0  # expirations may run ahead of this node's clock by this much


def training_entry_is_valid(record: DHTRecord, now: float) -> bool:
    """Pure: whether ``record`` is a small, short-lived, sub-keyed hivemind training entry."""
    if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
        return False  # a regular value could replace a block key's dictionary of records
    if len(record.subkey) > MAX_TRAINING_SUBKEY_BYTES + 8:
        return False
    if len(record.value) > MAX_TRAINING_VALUE_BYTES:
        return False
    if record.expiration_time > now + MAX_RECORD_TTL_S + CLOCK_SLACK_S:
        return False
    try:
        subkey = MSGPackSerializer.loads(record.subkey)
    except Exception:
        return False
    return isinstance(subkey, bytes) and 0 < len(subkey) <= MAX_TRAINING_SUBKEY_BYTES


class TrainingEntryValidator(RecordValidatorBase):
    """Accept a layerchain peer record or a hivemind training entry (see the module docstring)."""

    def validate(self, record: DHTRecord) -> bool:
        now = get_dht_time()
        return entry_is_valid(record, now) or training_entry_is_valid(record, now)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, TrainingEntryValidator)


class SharedDHT(DHT):
    """A ``hivemind.DHT`` served by an existing in-process ``DHTNode`` (make it with
    ``await SharedDHT.attach(discovery)``). ``shutdown`` stops serving hivemind's requests;
    the node itself belongs to the discovery, which closes it."""

    def __init__(self) -> None:
        super().__init__(start=False)  # the pipes and the ready future; no process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serve_task: asyncio.Task[None] | None = None

    @classmethod
    async def attach(cls, discovery: HivemindDiscovery) -> SharedDHT:
        """A SharedDHT over ``discovery``'s node, whose validator now also accepts training
        entries."""
        dht = cls()
        await discovery.call(_attach, dht=dht)
        dht._ready.set_result(None)
        return dht

    def is_alive(self) -> bool:  # mp.Process's: there is no process, only the serving task
        return self._serve_task is not None and not self._serve_task.done()

    def shutdown(self) -> None:
        loop, task = self._loop, self._serve_task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def join(self, timeout: float | None = None) -> None:  # mp.Process's: nothing to join
        return None

    def __del__(self) -> None:
        if self._parent_pid == os.getpid():
            self.shutdown()

    # hivemind.DHT's client side sends (method, future) through a pipe. A future that crosses
    # the pipe inside one process arrives as a copy, whose result the caller never sees; so
    # this process hands its requests to the DHT thread directly, and only forked averagers
    # use the pipe (there the copy reports back to its origin, as with a hivemind.DHT).

    def get(self, key: Any, latest: bool = False, return_future: bool = False, **kwargs: Any
            ) -> Any:
        future = self._submit("_get", key=key, latest=latest, **kwargs)
        return future if return_future else future.result()

    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None,
              return_future: bool = False, **kwargs: Any) -> Any:
        future = self._submit("_store", key=key, value=value, expiration_time=expiration_time,
                              subkey=subkey, **kwargs)
        return future if return_future else future.result()

    def run_coroutine(self, coro: Any, return_future: bool = False) -> Any:
        future = self._submit("_run_coroutine", coro=coro)
        return future if return_future else future.result()

    def _submit(self, method: str, **kwargs: Any) -> MPFuture[Any]:
        future: MPFuture[Any] = MPFuture()
        if os.getpid() == self._parent_pid and self._loop is not None:
            asyncio.run_coroutine_threadsafe(getattr(self, method)(future=future, **kwargs),
                                             self._loop)
        else:
            self._outer_pipe.send((method, [], dict(future=future, **kwargs)))
        return future

    async def _serve(self) -> None:
        """hivemind.DHT.run's request loop, on the discovery's DHT thread."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Semaphore(0)
        loop.add_reader(self._inner_pipe.fileno(), ready.release)
        tasks: set[asyncio.Task[Any]] = set()
        try:
            while True:
                await ready.acquire()
                while self._inner_pipe.poll():
                    method, args, kwargs = self._inner_pipe.recv()
                    if method == "_shutdown":  # hivemind.DHT.shutdown's message: not our node's
                        return
                    task = asyncio.create_task(getattr(self, method)(*args, **kwargs))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except (EOFError, OSError):  # every sender closed its end
            return
        finally:
            loop.remove_reader(self._inner_pipe.fileno())
            for task in tasks:
                task.cancel()


async def _attach(_owner: object, node: DHTNode, dht: SharedDHT) -> None:
    """On the DHT thread: bind ``dht`` to ``node`` and start serving its pipe."""
    dht._node = node
    dht._peer_id = node.peer_id
    dht._client_mode = node.protocol.client_mode
    node.protocol.record_validator = CompositeValidator([TrainingEntryValidator()])
    dht._loop = asyncio.get_running_loop()
    dht._serve_task = asyncio.create_task(dht._serve())
