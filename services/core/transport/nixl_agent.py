"""One NIXL agent per process, behind a small typed interface: host-memory WRITEs between pods.

    agent = NixlAgent("attn-a-3f9c01")                   # UCX backend, progressed by our calls
    agent.register([k0, v0, k1, v1, ...])                # contiguous host tensors, once (slow-ish)
    blob = agent.metadata()                              # bytes, exchanged out of band (Redis here)

    peer = agent.add_remote(blob)                        # on the writer: the remote's agent name
    transfer = agent.write(peer, local, remote, b"kv:7:0")   # post (shared memory: bytes move now)
    transfer.wait(deadline)                              # DONE, else NixlError (ERR or past deadline)

    agent.notifications()                                # on the target: {peer: [b"kv:7:0", ...]}

Descriptor lists are `Regions`: numpy uint64 [N, 2], row i = (address, length) of one contiguous
byte range of host memory (DRAM). A WRITE copies local row i into remote row i, so both lists have
the same lengths row by row. NIXL refuses remote rows outside the remote's registered memory.

A WRITE's notification reaches the target after that WRITE's data (NIXL's guarantee), so the target
may read the bytes once the notification is there. Nothing moves unless someone calls in: the writer
polls its transfers, the target polls notifications while it expects data (see `NixlAgent`).
Metadata and notifications are raw bytes: nothing is pickled. NIXL agents are not thread-safe in
the mode used here (no listener thread), so every call into the agent holds one lock.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
import torch

from services.core.errors import DisaggError
from services.core.transport.hugepages import advise_huge_pages

log = logging.getLogger(__name__)

# [N, 2] uint64 rows of (address, length in bytes).
Regions = npt.NDArray[np.uint64]


@functools.cache
def _nixl_errors() -> tuple[type[Exception], ...]:
    """Every exception type the NIXL bindings raise (they share no base class besides Exception).

    nixl is imported on first use, never at module import: its bundled protobuf and absl crash a
    process that also loads grpc_tools' protoc (the proto-stub test), so only processes that run
    the nixl transport may load it.
    """
    from nixl import _bindings

    return tuple(
        getattr(_bindings, n) for n in dir(_bindings) if n.startswith("nixl") and n.endswith("Error")
    )


def _route_nixl_logs() -> None:
    """nixl logs to stdout through its own handler; send its records to ours (stderr) instead: a pod's
    stdout carries only its "listening on" line, which launchers and tests read."""
    nixl_log = logging.getLogger("nixl")
    for handler in list(nixl_log.handlers):
        nixl_log.removeHandler(handler)
    nixl_log.propagate = True


class NixlError(DisaggError):
    """A NIXL call failed; the message names the peer, what failed and what to do."""

    def __init__(self, peer: str, what: str, fix: str) -> None:
        super().__init__(f"NIXL {what} (peer {peer}) failed; {fix}")
        self.peer = peer


class TransferState(Enum):
    IN_PROGRESS = "PROC"
    DONE = "DONE"
    FAILED = "ERR"


def regions(addresses: npt.ArrayLike, lengths: npt.ArrayLike) -> Regions:
    """Stack addresses [N] and lengths [N] (broadcast) into a descriptor list [N, 2]."""
    addr = np.asarray(addresses, dtype=np.uint64).reshape(-1)
    size = np.broadcast_to(np.asarray(lengths, dtype=np.uint64), addr.shape)
    return np.stack([addr, size], axis=1)


def coalesce(local: Regions, remote: Regions) -> tuple[Regions, Regions]:
    """Merge consecutive rows that continue each other on both sides (same bytes, fewer descriptors).

    A lane's blocks are often adjacent in the pool, and the writer's source rows always are, so a
    2048-token lane of 128 blocks usually becomes one descriptor: UCX moves large ranges far faster.
    """
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local rows but {len(remote)} remote rows; pair them one to one")
    if len(local) < 2:
        return local, remote
    lengths = local[:, 1]
    local_next = local[1:, 0] == local[:-1, 0] + lengths[:-1]
    continues = local_next & (remote[1:, 0] == remote[:-1, 0] + lengths[:-1])
    starts = np.flatnonzero(np.concatenate([[True], ~continues]))
    merged = np.add.reduceat(lengths, starts).astype(np.uint64)
    return regions(local[starts, 0], merged), regions(remote[starts, 0], merged)


def encode_metadata(blob: bytes) -> str:
    """Agent metadata as text for a Redis client that decodes replies (base64, never pickle)."""
    return base64.b64encode(blob).decode("ascii")


def decode_metadata(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def metadata_key(key_prefix: str, pod_id: str) -> str:
    """Where a pod publishes its agent metadata: `<prefix>nixl:<pod_id>` (string, base64)."""
    return f"{key_prefix}nixl:{pod_id}"


@dataclass(slots=True, frozen=True, eq=False)
class Registration:
    """Memory registered with one `register` call; pass it to `deregister`."""

    descs: Any  # NIXL's registration descriptor list


class Transfer:
    """One posted WRITE. `wait` or `release` it; releasing an unfinished one tries to cancel it."""

    def __init__(self, agent: NixlAgent, handle: Any, peer: str, nbytes: int) -> None:
        self._agent = agent
        self._handle = handle
        self.peer = peer
        self.nbytes = nbytes
        self._done = False
        self._failed_state = False  # ended in ERR: no more bytes will move

    def state(self) -> TransferState:
        if self._done or self._failed_state:
            return TransferState.DONE if self._done else TransferState.FAILED
        if self._handle is None:
            raise self._failed("it was released before it finished")
        with self._agent.lock:
            try:
                state = TransferState(self._agent.raw.check_xfer_state(self._handle))
            except _nixl_errors() as exc:
                raise self._failed(f"{type(exc).__name__}: {exc}") from None
        self._done = state is TransferState.DONE
        self._failed_state = state is TransferState.FAILED
        return state

    def wait(self, deadline: float, poll_s: float = 50e-6) -> None:
        """Poll until DONE or `deadline` (time.monotonic); raises NixlError on ERR or timeout."""
        while (state := self.state()) is TransferState.IN_PROGRESS:
            if time.monotonic() > deadline:
                self.release()
                raise NixlError(
                    self.peer,
                    f"WRITE of {self.nbytes} bytes (not done by its deadline)",
                    "the peer is overloaded or unreachable; retry, or give the transfer more time",
                )
            time.sleep(poll_s)
        self.release()
        if state is TransferState.FAILED:
            raise self._failed("the transfer ended in state ERR")

    def settle(self, deadline: float, poll_s: float = 50e-6) -> bool:
        """Wait until the WRITE is over either way (DONE or ERR) or `deadline`; True if it is over,
        False if it may still be moving bytes (it is released, which asks the backend to cancel)."""
        try:
            self.wait(deadline, poll_s)
        except NixlError:
            return self._done or self._failed_state
        return True

    def release(self) -> None:
        """Free the request; an active one is cancelled where the backend can (else NIXL keeps it)."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        # Could not cancel: NIXL keeps the handle and releases it when the agent closes.
        with self._agent.lock, contextlib.suppress(*_nixl_errors()):
            handle.release()

    def _failed(self, cause: str) -> NixlError:
        return NixlError(
            self.peer,
            f"WRITE of {self.nbytes} bytes ({cause})",
            "the peer restarted or went away; fetch its metadata again and re-plan, or use another pod",
        )


class NixlAgent:
    """A NIXL agent with the UCX backend, progressed by its callers; host memory (DRAM) only here."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        try:
            from nixl._api import nixl_agent, nixl_agent_config  # see _nixl_errors: loaded on first use
        except ImportError as exc:
            raise NixlError(name, f"import of nixl ({exc})", "install nixl (pip install nixl)") from None
        _route_nixl_logs()
        start_errors: tuple[type[Exception], ...] = (RuntimeError, *_nixl_errors())
        try:
            # No progress thread: nixl's Python API runs it without a delay, so it spins a whole core
            # per process even when idle. Progress happens in our own calls instead: the writer's
            # post and polls (with shared memory the bytes move right there) and the target's
            # notification polls (see services/attention/nixl_import.py).
            self.raw = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        except start_errors as exc:
            raise NixlError(
                name,
                f"agent creation ({type(exc).__name__}: {exc})",
                "check that nixl and its UCX plugin load",
            ) from None
        if "UCX" not in self.raw.backends:
            raise NixlError(name, "UCX backend creation", "install a nixl build with the UCX plugin")
        self._registered: list[Registration] = []

    def register(self, tensors: Sequence[torch.Tensor]) -> Registration:
        """Register contiguous host tensors so peers may WRITE into them (or we from them). Keep the
        tensors alive until `deregister` or `close`: NIXL holds their addresses. Their memory is first
        moved to transparent huge pages where the kernel allows (hugepages.py; DISAGG_HUGE_PAGES=0: not)."""
        for i, t in enumerate(tensors):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise NixlError(
                    self.name,
                    f"registration of tensor {i} ({t.device}, contiguous={t.is_contiguous()})",
                    "register contiguous CPU tensors (host memory); device memory is not wired up yet",
                )
        advised = sum(advise_huge_pages(t) for t in tensors)  # faster CMA copies (hugepages.py)
        log.debug("%s: %d of %d tensors on huge pages", self.name, advised, len(tensors))
        with self.lock:
            try:
                registration = Registration(self.raw.register_memory(list(tensors)))
            except _nixl_errors() as exc:
                raise NixlError(self.name, f"memory registration ({exc})", "check free memory") from None
            self._registered.append(registration)
        return registration

    def deregister(self, registration: Registration) -> None:
        with self.lock:
            if registration in self._registered:
                self._registered.remove(registration)
                self.raw.deregister_memory(registration.descs)

    def metadata(self) -> bytes:
        """Everything a peer needs to reach this agent and its registered memory."""
        with self.lock:
            return bytes(self.raw.get_agent_metadata())

    def add_remote(self, metadata: bytes) -> str:
        """Load a peer's metadata and connect to it; returns the peer's agent name."""
        with self.lock:
            try:
                name = self.raw.add_remote_agent(metadata)
                peer = name.decode() if isinstance(name, bytes) else str(name)
                self.raw.make_connection(peer)  # the first WRITE would otherwise pay ~0.1 s for it
            except _nixl_errors() as exc:
                raise NixlError(
                    "(from metadata)",
                    f"loading peer metadata ({type(exc).__name__}: {exc})",
                    "the metadata is stale or corrupt; fetch it again once the peer has republished it",
                ) from None
        return peer

    def remove_remote(self, peer: str) -> None:
        """Forget a peer (it restarted under a new name); unknown names are a no-op."""
        with self.lock, contextlib.suppress(*_nixl_errors()):  # already gone
            self.raw.remove_remote_agent(peer)

    def write(self, peer: str, local: Regions, remote: Regions, notification: bytes) -> Transfer:
        """Post a WRITE of local rows into remote rows; `notification` reaches the peer after the data."""
        if local.shape != remote.shape or not np.array_equal(local[:, 1], remote[:, 1]):
            raise ValueError("local and remote descriptor lists must pair rows of equal lengths")
        nbytes = int(local[:, 1].sum())
        with self.lock:
            try:
                handle = self.raw.initialize_xfer(
                    "WRITE", self._xfer_list(local), self._xfer_list(remote), peer, notification
                )
                state = self.raw.transfer(handle)
            except _nixl_errors() as exc:
                raise NixlError(
                    peer,
                    f"posting a WRITE of {nbytes} bytes in {len(local)} descriptors ({type(exc).__name__})",
                    "NOT_FOUND: the remote rows are outside its registered memory or its metadata is "
                    "missing; REMOTE_DISCONNECT: it went away. Re-fetch its metadata and re-plan",
                ) from None
        transfer = Transfer(self, handle, peer, nbytes)
        if state == TransferState.FAILED.value:
            transfer.release()
            raise transfer._failed("posting returned ERR")
        return transfer

    def notifications(self) -> dict[str, list[bytes]]:
        """Notifications that arrived since the last call: {peer agent name: [message, ...]}."""
        with self.lock:
            return {str(peer): list(messages) for peer, messages in self.raw.get_new_notifs().items()}

    def close(self) -> None:
        """Deregister memory. Peers' WRITEs into it fail from now on."""
        with self.lock:
            for registration in self._registered:
                with contextlib.suppress(*_nixl_errors()):  # the agent's destructor releases the rest
                    self.raw.deregister_memory(registration.descs)
            self._registered.clear()

    def _xfer_list(self, rows: Regions) -> Any:
        device_ids = np.zeros((len(rows), 1), dtype=np.uint64)  # host memory: device 0
        return self.raw.get_xfer_descs(np.ascontiguousarray(np.hstack([rows, device_ids])), "DRAM")


class PeerDirectory:
    """Peers' agents loaded from the metadata their pods publish in Redis (`metadata_key`).

    One entry per pod id. A pod that restarted comes back under a new agent name: the old one is
    forgotten and the new metadata loaded, once. Not thread-safe (one writer thread uses it).
    """

    def __init__(self, agent: NixlAgent, client: redis.Redis, key_prefix: str) -> None:
        self.agent = agent
        self.client = client
        self.key_prefix = key_prefix
        self._loaded: dict[str, str] = {}  # pod id -> agent name loaded into `agent`

    def peer(self, pod_id: str, agent_name: str) -> str:
        """The loaded agent name of `pod_id`, which must be `agent_name` (what the pod says it runs)."""
        if self._loaded.get(pod_id) == agent_name:
            return agent_name
        key = metadata_key(self.key_prefix, pod_id)
        try:
            text = self.client.get(key)
        except redis.RedisError as exc:
            raise NixlError(pod_id, f"reading its metadata from Redis ({exc})", "check Redis is up") from None
        if not isinstance(text, str):
            raise NixlError(
                pod_id,
                f"lookup of its agent metadata at Redis key {key!r} (missing)",
                "start the pod with --transport nixl, registered in this Redis with the same key prefix "
                "(DISAGG_REDIS_KEY_PREFIX)",
            )
        old = self._loaded.pop(pod_id, None)
        if old is not None:
            self.agent.remove_remote(old)
        try:
            metadata = decode_metadata(text)
        except ValueError:
            raise NixlError(pod_id, f"decoding {key!r} (not base64)", f"delete the key (DEL {key})") from None
        loaded = self.agent.add_remote(metadata)
        if loaded != agent_name:
            self.agent.remove_remote(loaded)
            raise NixlError(
                pod_id,
                f"matching its metadata: Redis holds agent {loaded!r}, the pod runs {agent_name!r}",
                "the pod restarted and has not republished yet; retry in a second",
            )
        self._loaded[pod_id] = loaded
        return loaded
