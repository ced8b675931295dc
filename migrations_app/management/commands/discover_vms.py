from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import sync_inventory
from migrations_app.backends import get_vma_client
from migrations_app.vma_client import VmaError


class Command(BaseCommand):
    help = "Pull the VM inventory from the VMA agent into the portal."

    def handle(self, *args: Any, **options: Any) -> None:
        client = get_vma_client()
        try:
            vms = client.inventory()
        except VmaError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            client.close()
        count = sync_inventory(vms)
        for vm in vms:
            self.stdout.write(f"{vm['id']}  {vm['name']}  ({len(vm.get('disks', []))} disks)")
        self.stdout.write(f"{count} VMs in the inventory")
