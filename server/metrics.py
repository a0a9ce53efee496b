"""Prometheus exposition of the node's rooms and forwarding counters (read at scrape time)."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .rooms import RoomRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "packets_in": ("skyclass_rtp_packets_in", "RTP packets received from publishers"),
    "bytes_in": ("skyclass_rtp_bytes_in", "RTP bytes received from publishers"),
    "packets_out": ("skyclass_rtp_packets_out", "RTP packets forwarded to viewers"),
    "bytes_out": ("skyclass_rtp_bytes_out", "SRTP bytes forwarded to viewers"),
    "keyframe_requests_received": ("skyclass_keyframe_requests_received", "PLI/FIR received from viewers"),
    "keyframe_requests_sent": ("skyclass_keyframe_requests_sent", "PLIs sent to publishers after aggregation"),
    "nacks_received": ("skyclass_nacks_received", "NACKed packets reported by viewers"),
    "retransmissions": ("skyclass_retransmissions", "packets retransmitted from the packet cache"),
    "dropped_slow_viewer": ("skyclass_packets_dropped_slow_viewer", "packets dropped because a viewer's socket was full"),
}


# Counters a worker reports that describe the relay hop, not the node's ingress.
_INGRESS_ONLY = ("packets_in", "bytes_in")


def node_counters(rooms: RoomRegistry, workers: list[dict]) -> dict[str, int]:
    """The node's forwarding counters: the front's (ingress, and viewers it holds itself) plus
    what each fan-out worker reports of its own viewers."""
    values = rooms.counters.as_dict()
    totals: dict[str, int] = {}
    for key in _COUNTERS:
        totals[key] = values[key]
        if key not in _INGRESS_ONLY:
            totals[key] += sum(w["counters"].get(key, 0) for w in workers)
    return totals


class SkyclassCollector:
    def __init__(self, rooms: RoomRegistry, pool: Callable[[], Optional[object]]) -> None:
        self._rooms = rooms
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        rooms = self._rooms
        yield GaugeMetricFamily("skyclass_rooms", "rooms open on this node", value=len(rooms.rooms))
        yield GaugeMetricFamily(
            "skyclass_publishers", "publishing sessions", value=sum(1 for r in rooms.rooms.values() if r.publisher)
        )
        viewers = GaugeMetricFamily("skyclass_viewers", "viewing sessions per room", labels=["room"])
        for room in rooms.rooms.values():
            viewers.add_metric([room.name], len(room.viewers))
        yield viewers
        yield GaugeMetricFamily(
            "skyclass_viewers_total", "viewing sessions on this node", value=sum(len(r.viewers) for r in rooms.rooms.values())
        )
        pool = self._pool()
        workers = pool.worker_stats() if pool is not None else []  # type: ignore[attr-defined]
        totals = node_counters(rooms, workers)
        for key, (name, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text + " (node total)", value=totals[key])
        if not workers:
            return
        up = GaugeMetricFamily("skyclass_worker_up", "1 if the fan-out worker is running", labels=["worker"])
        wv = GaugeMetricFamily("skyclass_worker_viewers", "viewers held by each fan-out worker", labels=["worker"])
        restarts = CounterMetricFamily("skyclass_worker_restarts", "fan-out worker restarts", labels=["worker"])
        cpu = CounterMetricFamily("skyclass_worker_cpu_seconds", "CPU time of each fan-out worker process",
                                  labels=["worker"])
        for w in workers:
            label = [str(w["worker"])]
            up.add_metric(label, 1 if w["up"] else 0)
            wv.add_metric(label, w["viewers"])
            restarts.add_metric(label, w["restarts"])
            cpu.add_metric(label, w["counters"].get("cpu_seconds", 0.0))
        yield up
        yield wv
        yield restarts
        yield cpu
        for key, (name, help_text) in _COUNTERS.items():
            family = CounterMetricFamily(name.replace("skyclass_", "skyclass_worker_", 1), help_text + " per worker",
                                         labels=["worker"])
            for w in workers:
                family.add_metric([str(w["worker"])], w["counters"].get(key, 0))
            yield family


def make_registry(rooms: RoomRegistry, pool: Callable[[], Optional[object]] = lambda: None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SkyclassCollector(rooms, pool))  # type: ignore[arg-type]
    # process_cpu_seconds_total & co. of the front; workers' CPU is skyclass_worker_cpu_seconds.
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
