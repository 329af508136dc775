"""LAN discovery with DNS-SD over mDNS (the only module that imports zeroconf).

Each node advertises ``_radmesh._tcp.local.`` with TXT ``id`` (node id), ``v``
(protocol version) and ``ptr`` (a small pointer signed by the node key: its LAN
endpoint and a sequence). A browsing node treats all of that as a hint: it
fetches the full record from the endpoint and keeps it only if the record
verifies and belongs to the advertised id.

The endpoint in a pointer is chosen by whoever holds the key that signed it,
so it is contacted only when that key is trusted (``is_trusted``), and only as
a bare ``http(s)://host:port`` plus our own path. Pointers of other keys are
remembered (bounded) without contacting anything, and fetched once the key
becomes trusted (:meth:`LanDiscovery.lookup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from crypto.errors import CryptoError
from crypto.identity import NodeId
from registry.errors import RecordError, RegistryError
from registry.lan import fetch_record
from registry.records import LanPointer, NodeRecord

log = logging.getLogger(__name__)

SERVICE_TYPE = "_radmesh._tcp.local."
PROTOCOL_VERSION = b"1"
MAX_CONCURRENT_FETCHES = 8
MAX_FOUND = 1024
MAX_PENDING_RESOLVES = 64  # announcements waiting to be resolved; more are dropped


def instance_name(node_id: NodeId) -> str:
    return f"radmesh-{str(node_id).replace('-', '')[:16].lower()}.{SERVICE_TYPE}"


class LanDiscovery:
    """Advertise this node and browse for others. Bind tests to ``["127.0.0.1"]``."""

    def __init__(
        self,
        *,
        interfaces: list[str] | None = None,
        own_id: NodeId | None = None,
        on_found: Callable[[NodeRecord], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        is_trusted: Callable[[bytes], bool] = lambda _key: False,
    ) -> None:
        """``is_trusted(public_key)``: may this node's announced endpoint be contacted?"""
        self._interfaces = interfaces
        self._own_id = own_id
        self._on_found = on_found
        self._clock = clock
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetching = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self._is_trusted = is_trusted
        self.found: dict[NodeId, NodeRecord] = {}
        self.heard: dict[NodeId, LanPointer] = {}  # untrusted: announced, never contacted
        self.refused: dict[NodeId, str] = {}  # why an advertised id's service was ignored
        self.rejected = 0
        self._changed = asyncio.Event()

    async def start(self) -> None:
        if self._interfaces:
            self._azc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        else:
            self._azc = AsyncZeroconf()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)
            await self._azc.async_close()
            self._azc = None

    def _zc(self) -> AsyncZeroconf:
        if self._azc is None:
            raise RegistryError("LAN discovery is not started")
        return self._azc

    async def advertise(self, pointer: LanPointer) -> None:
        """Announce this node; ``pointer.endpoint`` is its LAN endpoint URL."""
        parts = urlsplit(pointer.endpoint)
        if parts.hostname is None or parts.port is None:
            raise RecordError("LAN endpoint must be http://HOST:PORT")
        address = ipaddress.ip_address(parts.hostname)
        name = instance_name(pointer.node_id)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            addresses=[address.packed],
            port=parts.port,
            properties={
                b"id": str(pointer.node_id).encode(),
                b"v": PROTOCOL_VERSION,
                b"ptr": pointer.to_wire(),
            },
            server=name.split(".", 1)[0] + ".local.",
        )
        zc = self._zc()
        if self._info is None:
            await zc.async_register_service(info, allow_name_change=True)
        else:
            await zc.async_update_service(info)
        self._info = info

    async def browse(self) -> None:
        self._browser = AsyncServiceBrowser(
            self._zc().zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        if len(self._tasks) >= MAX_PENDING_RESOLVES:
            self.rejected += 1  # an announcement flood: drop, the next announcement retries
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        async with self._fetching:
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(self._zc().zeroconf, 3000):
                return
            try:
                record = await self._verify(info)
            except (RegistryError, CryptoError) as exc:
                self.rejected += 1
                log.debug("ignoring mDNS service %s: %s", name, exc)
                return
            if record is None:
                return
            await self._keep(record)

    async def _keep(self, record: NodeRecord) -> None:
        held = self.found.get(record.node_id)
        if held is not None and held.sequence >= record.sequence:
            return
        if held is None and len(self.found) >= MAX_FOUND:
            return
        self.found[record.node_id] = record
        self.heard.pop(record.node_id, None)
        self._changed.set()
        if self._on_found is not None:
            await self._on_found(record)

    async def _verify(self, info: AsyncServiceInfo) -> NodeRecord | None:
        props = info.properties
        if props.get(b"v") != PROTOCOL_VERSION:
            raise RecordError("unsupported radmesh mDNS version")
        raw_id, raw_ptr = props.get(b"id"), props.get(b"ptr")
        if not raw_id or not raw_ptr:
            raise RecordError("mDNS service lacks id or ptr")
        advertised = NodeId.parse(raw_id.decode(errors="replace"))
        if advertised == self._own_id:
            return None
        try:
            pointer = LanPointer.from_wire(raw_ptr)
            if pointer.node_id != advertised:
                raise RecordError("mDNS pointer is signed by another node than the advertised id")
            if not self._is_trusted(pointer.public_key):
                self._hear(pointer)
                return None
            return await fetch_record(pointer.endpoint, int(self._clock()), advertised)
        except (RegistryError, CryptoError) as exc:
            if advertised in self.refused or len(self.refused) < MAX_FOUND:
                self.refused[advertised] = str(exc)
            raise

    def _hear(self, pointer: LanPointer) -> None:
        held = self.heard.get(pointer.node_id)
        if held is not None and held.sequence >= pointer.sequence:
            return
        if held is None and len(self.heard) >= MAX_FOUND:
            return
        self.heard[pointer.node_id] = pointer
        self._changed.set()

    async def lookup(self, node_id: NodeId) -> NodeRecord | None:
        """The node's LAN record: fetched now if it was heard of before it became trusted."""
        pointer = self.heard.get(node_id)
        if node_id in self.found or pointer is None or not self._is_trusted(pointer.public_key):
            return self.found.get(node_id)
        async with self._fetching:
            try:
                record = await fetch_record(pointer.endpoint, int(self._clock()), node_id)
            except (RegistryError, CryptoError) as exc:
                self.rejected += 1
                log.debug("LAN record of %s not fetched: %s", node_id.short(), exc)
                return None
        await self._keep(record)
        return self.found.get(node_id)

    async def wait_for(self, node_id: NodeId) -> NodeRecord:
        """Wait until ``node_id`` is found (wrap in ``asyncio.timeout``)."""
        while node_id not in self.found:
            self._changed.clear()
            await self._changed.wait()
        return self.found[node_id]
