"""What the failover commands share: a VM by UUID or name, and an answer as text or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .failover import Check
from .models import MigrationJob, SourceVM


def find_vm(ref: str) -> SourceVM:
    vm = SourceVM.objects.filter(name=ref).first() or SourceVM.objects.filter(vm_id=ref.lower()).first()
    if vm is None:
        raise CommandError(f"no VM {ref!r} in the inventory (by name or VMware instance UUID)")
    return vm


def job_json(job: MigrationJob) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "vm": job.vm.name,
        "kind": job.kind,
        "state": job.state,
        "step": job.current_step,
        "destination_vm_id": job.destination_vm_id,
        "error": job.error,
    }


def report(command: BaseCommand, as_json: bool, payload: dict[str, Any], text: str) -> None:
    command.stdout.write(json.dumps(payload) if as_json else text)


def checks_json(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
