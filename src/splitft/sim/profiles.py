"""Simulated devices: what each client's hardware and links can do, round by round.

Settings (``sim.mix``, ``sim.profiles``, ``sim.changes``) are in MB, Mbit/s and
ms; a :class:`Device` holds them in bytes, bit/s and seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from splitft.config import DeviceProfile, ServerConfig, SimConfig

MB = 1e6


@dataclass(frozen=True)
class Device:
    """One client's device: compute slowdown, memory budget and links."""

    name: str
    slowdown: float  # device seconds per second of the probed machine
    memory: float  # bytes the client part may use (inf: no limit)
    up_bps: float  # bit/s
    down_bps: float
    rtt: float  # seconds

    @classmethod
    def of(cls, name: str, p: DeviceProfile) -> Device:
        return cls(
            name=name,
            slowdown=p.slowdown,
            memory=p.memory_mb * MB if p.memory_mb > 0 else math.inf,
            up_bps=p.up_mbps * 1e6,
            down_bps=p.down_mbps * 1e6,
            rtt=p.rtt_ms / 1e3,
        )

    def up_seconds(self, nbytes: float) -> float:
        """Time for ``nbytes`` to reach the server: serialisation + half the RTT."""
        return nbytes * 8 / self.up_bps + self.rtt / 2

    def down_seconds(self, nbytes: float) -> float:
        return nbytes * 8 / self.down_bps + self.rtt / 2


@dataclass(frozen=True)
class Batching:
    """How the server takes requests that may share a batch (``server.*``)."""

    window_s: float = 0.0  # a free server waits this long for more requests
    max_slots: int = 0  # the most token slots in a batch (0: no limit)


@dataclass(frozen=True)
class ServerDevice:
    speed: float  # compute speed relative to the probed machine
    workers: int
    batching: Batching | None = None  # None: one request at a time


def devices_at(sim: SimConfig, num_clients: int, rnd: int) -> dict[int, Device]:
    """Each client's device in round ``rnd``: its mix profile with the changes due.

    Changes apply in the order given, each from its round on.

    Raises:
        ValueError: a change names a client that does not exist.
    """
    named = sim.profile_names()
    devices = {
        cid: Device.of(sim.mix[cid % len(sim.mix)], named[sim.mix[cid % len(sim.mix)]])
        for cid in range(num_clients)
    }
    for i, ch in enumerate(sim.changes):
        if ch.client >= num_clients:
            raise ValueError(
                f"sim.changes[{i}].client={ch.client} is not allowed: "
                f"a client id in [0, {num_clients})"
            )
        if ch.round > rnd:
            continue
        dev = devices[ch.client]
        if ch.profile:
            dev = Device.of(ch.profile, named[ch.profile])
        fields = {
            f: getattr(ch, f)
            for f in ("slowdown", "memory_mb", "up_mbps", "down_mbps", "rtt_ms")
            if getattr(ch, f) is not None
        }
        if fields:
            prof = DeviceProfile(
                slowdown=dev.slowdown,
                memory_mb=0.0 if math.isinf(dev.memory) else dev.memory / MB,
                up_mbps=dev.up_bps / 1e6,
                down_mbps=dev.down_bps / 1e6,
                rtt_ms=dev.rtt * 1e3,
            )
            dev = Device.of(dev.name, replace(prof, **fields))
        devices[ch.client] = dev
    return devices


def server_device(sim: SimConfig, server: ServerConfig | None = None) -> ServerDevice:
    """The server as the clock sees it; ``server``: its batching settings."""
    batching = None
    if server is not None and server.batching:
        batching = Batching(server.batch_window_ms / 1e3, server.max_batch_tokens)
    return ServerDevice(sim.server_speed, sim.server_workers, batching)
