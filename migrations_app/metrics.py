"""What an operator alerts on, for Prometheus (prometheus_client): read from the database at each scrape,
so every web process answers the same for the whole fleet of nodes."""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Sum
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exports.models import NbdServerState

from .models import JobDisk, JobState, MigrationJob, OmaNode
from .slots import used_slots_by_node
from .workflow import stale_before

HEALTHS = [choice.value for choice in NbdServerState.Health]


class PortalCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._slots()
        yield from self._nbd()

    def _jobs(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("oma_jobs", "Migration jobs by state", labels=["state"])
        counts = dict(MigrationJob.objects.values_list("state").annotate(n=Count("id")).values_list("state", "n"))
        for state in JobState.values:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        copied = JobDisk.objects.aggregate(total=Sum("bytes_done"))["total"] or 0
        yield CounterMetricFamily("oma_copied_bytes", "Bytes the VMA has copied, all syncs of all jobs", copied)
        rate = (
            JobDisk.objects.filter(job__state=JobState.REPLICATING).aggregate(rate=Sum("throughput_bps"))["rate"] or 0
        )
        yield GaugeMetricFamily("oma_copy_throughput_bytes_per_second", "Throughput of the running copies", rate)

    def _slots(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("oma_attach_slots_used", "Volumes holding an attach slot", labels=["node"])
        total = GaugeMetricFamily("oma_attach_slots", "Attach slots of the node", labels=["node"])
        held = used_slots_by_node()
        up = GaugeMetricFamily("oma_node_up", "1 while the node's follower beats (its heartbeat)", labels=["node"])
        drained = GaugeMetricFamily("oma_node_drained", "1 while nothing new starts on the node", labels=["node"])
        stale = stale_before()
        nodes = OmaNode.objects.filter(retired_at__isnull=True)
        for node in nodes.only("name", "attach_slots", "follower_beat_at", "drained_at"):
            used.add_metric([node.name], held.get(node.pk, 0))
            total.add_metric([node.name], node.attach_slots)
            up.add_metric([node.name], int(node.is_up(stale)))
            drained.add_metric([node.name], int(node.drained))
        yield from (used, total, up, drained)

    def _nbd(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("oma_nbd_server_up", "1 when the NBD server is verified and serving", labels=["node"])
        health = GaugeMetricFamily("oma_nbd_server_health", "The NBD server's health (1 for its state)",
                                   labels=["node", "health"])  # fmt: skip
        expected = GaugeMetricFamily("oma_nbd_exports_expected", "Exports the database says are live", labels=["node"])
        served = GaugeMetricFamily("oma_nbd_exports_served", "Of those, exports the server serves", labels=["node"])
        counters = {
            "reload_count": CounterMetricFamily("oma_nbd_reloads", "nbd-server reloads", labels=["node"]),
            "restarts_detected": CounterMetricFamily("oma_nbd_restarts", "NBD server restarts", labels=["node"]),
            "crashes_detected": CounterMetricFamily("oma_nbd_crashes", "NBD server crashes seen", labels=["node"]),
            "lost_exports_detected": CounterMetricFamily(
                "oma_nbd_lost_exports", "Exports found not served and repaired", labels=["node"]
            ),
        }
        retired = OmaNode.objects.filter(retired_at__isnull=False).values("name")
        for state in NbdServerState.objects.exclude(node__in=retired):
            up.add_metric([state.node], 1 if state.health in ("ok", "degraded") else 0)
            for value in HEALTHS:
                health.add_metric([state.node, value], 1 if state.health == value else 0)
            expected.add_metric([state.node], state.exports_expected)
            served.add_metric([state.node], state.exports_served)
            for field, family in counters.items():
                family.add_metric([state.node], getattr(state, field))
        yield from (up, health, expected, served, *counters.values())
