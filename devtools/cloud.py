"""Failover mappings for the demo and the tests: the simulator's source networks onto whatever the
cloud offers (its first networks, its isolated one for tests), every offering and both templates."""

from __future__ import annotations

from migrations_app.compute import ComputeBackend
from migrations_app.models import NetworkMapping, OfferingMapping, TemplateMapping

SOURCE_NETWORKS = ["VM Network", "Storage"]


def map_cloud(compute: ComputeBackend) -> None:
    networks = compute.networks()
    routed = [n for n in networks if not n.isolated]
    isolated = next((n for n in networks if n.isolated), None)
    for source, network in zip(SOURCE_NETWORKS, routed, strict=False):
        NetworkMapping.objects.update_or_create(
            source_network=source,
            defaults={"network_id": network.id, "test_network_id": isolated.id if isolated else ""},
        )
    for offering in compute.offerings():
        OfferingMapping.objects.update_or_create(
            name=offering.name[:100],
            defaults={"offering_id": offering.id, "cpus": offering.cpus, "memory_mib": offering.memory_mib},
        )
    for template in compute.templates():
        firmware = "efi" if template.boot in ("efi", "uefi") else "bios"
        TemplateMapping.objects.update_or_create(firmware=firmware, defaults={"template_id": template.id})
