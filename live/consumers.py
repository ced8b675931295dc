"""The one websocket: authenticate, subscribe to the page's group in this process's relay, send a fresh
snapshot, then receive the fragments the relay renders. A reconnect is a new connect, so it always
starts from a snapshot."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from omaportal.web.roles import can_operate, can_view

from .relay import groups_for, relay

# Application close codes (4000-4999): the page shows "signed out" instead of reconnecting forever.
CLOSE_NOT_ALLOWED = 4403
CLOSE_UNKNOWN_PAGE = 4404  # no such page, or no such job: nothing would ever be sent


def _role_and_job(user: Any, job_id: str | None) -> tuple[str | None, int | None]:
    from migrations_app.models import MigrationJob

    if not can_view(user):
        return None, None
    role = "operator" if can_operate(user) else "viewer"
    job_pk = MigrationJob.objects.filter(job_id=job_id).values_list("pk", flat=True).first() if job_id else None
    return role, job_pk


class LiveConsumer(AsyncWebsocketConsumer):
    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined = []
        query = parse_qs(self.scope.get("query_string", b"").decode("ascii", "replace"))
        page = query.get("page", ["dashboard"])[0]
        role, job_pk = await database_sync_to_async(_role_and_job)(self.scope.get("user"), query.get("job", [None])[0])
        if role is None:
            await self.close(code=CLOSE_NOT_ALLOWED)
            return
        groups = groups_for(page, role, job_pk)
        if not groups:
            await self.close(code=CLOSE_UNKNOWN_PAGE)
            return
        await self.accept()
        # Join first, then snapshot: a change in between is sent after the snapshot, never lost.
        for group in groups:
            relay.watch(group, self)
            self.groups_joined.append(group)
        await relay.ensure_started()
        for group in self.groups_joined:
            html = await relay.snapshot(group)
            if html:
                await self.send(text_data=html)

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            relay.unwatch(group, self)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The browser only listens; anything it sends is ignored."""
