"""Per-track cache of recently forwarded packets, shared by all students, for NACK repair."""

from __future__ import annotations

from typing import NamedTuple, Optional


class CachedPacket(NamedTuple):
    seq: int
    timestamp: int
    marker: int
    payload: bytes


class PacketCache:
    """A ring of the last ``size`` packets keyed by the router's sequence number.

    Stored once per track in the router's sequence space, so a retransmission for any
    student is a lookup plus that student's own header rewrite: the teacher is never
    asked to repair one student's loss. 512 packets is ~1.5 s of a 1 Mbps stream, more
    than a student's NACK round trip.
    """

    __slots__ = ("_slots", "_mask")

    def __init__(self, size: int = 512) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError("cache size must be a power of two")
        self._slots: list[Optional[CachedPacket]] = [None] * size
        self._mask = size - 1

    def put(self, packet: CachedPacket) -> None:
        self._slots[packet.seq & self._mask] = packet

    def get(self, seq: int) -> Optional[CachedPacket]:
        entry = self._slots[seq & self._mask]
        if entry is not None and entry.seq == seq:
            return entry
        return None
