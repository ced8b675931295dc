"""The live-update relay: one per web process. It tails the outbox (``LiveUpdate`` rows written by any
process: django-q2 workers, management commands, other web processes), renders each watched group's
fragments once through the page registry, and writes them to this process's sockets in that group.

Waking up: PostgreSQL LISTEN (the writers' NOTIFY arrives at their commit), with a one-second poll as
a safety net; SQLite polls every 50 ms (an indexed ``id > last`` query). Whatever arrived while a
render ran is coalesced into the next one, so a burst of progress costs one render per tick, not one
per write: the socket cannot be flooded however fast a copy runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any, Protocol

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.db import close_old_connections, connections

from .models import LiveUpdate
from .outbox import NOTIFY_CHANNEL
from .registry import Changes, Group, render_group

log = logging.getLogger(__name__)
SQLITE_POLL = 0.05
PG_SAFETY_POLL = 1.0
# At most this often a group gets a message, however fast changes arrive (PostgreSQL wakes the relay on
# every NOTIFY): a fast copy cannot flood the sockets, and whatever came in meanwhile is coalesced.
MIN_SEND_INTERVAL = 0.05


def read_changes(last_id: int) -> Changes:
    changes = Changes(last_id)
    for pk, topic, key in LiveUpdate.objects.filter(id__gt=last_id).values_list("id", "topic", "key"):
        changes.last_id = max(changes.last_id, pk)
        changes.add(topic, key)
    return changes


def _render_all(groups: list[Group], changes: Changes | None) -> dict[Group, str]:
    try:
        return {group: html for group in groups if (html := render_group(group, changes))}
    finally:
        close_old_connections()


class Subscriber(Protocol):
    async def send(
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None: ...


class Relay:
    """Fans fragments out to this process's sockets directly. Every process runs its own relay over
    the shared outbox, so no channel layer is needed between processes; skipping the in-memory layer's
    per-socket queues roughly halves the cost of a send, which is what bounds 50 watching browsers."""

    def __init__(self) -> None:
        self.watchers: dict[Group, set[Subscriber]] = defaultdict(set)
        self.task: asyncio.Task[None] | None = None
        self.last_id = 0
        self.sent = 0

    def watch(self, group: Group, subscriber: Subscriber) -> None:
        self.watchers[group].add(subscriber)

    def unwatch(self, group: Group, subscriber: Subscriber) -> None:
        watching = self.watchers.get(group)
        if watching is None:
            return  # already left (a socket closed by its recheck, then disconnected)
        watching.discard(subscriber)
        if not watching:
            del self.watchers[group]

    async def ensure_started(self) -> None:
        if self.task is None or self.task.done():
            self.last_id = await database_sync_to_async(self._max_id)()
            self.task = asyncio.get_running_loop().create_task(self._run())

    @staticmethod
    def _max_id() -> int:
        return LiveUpdate.objects.order_by("-id").values_list("id", flat=True).first() or 0

    async def snapshot(self, group: Group) -> str:
        rendered = await sync_to_async(_render_all, thread_sensitive=True)([group], None)
        return rendered.get(group, "")

    async def _run(self) -> None:
        listener = await _PgListener.open() if connections["default"].vendor == "postgresql" else None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if listener is not None:
                    await listener.wait(PG_SAFETY_POLL)
                else:
                    await asyncio.sleep(SQLITE_POLL)
                started = loop.time()
                try:
                    if await self._tick():
                        await asyncio.sleep(max(0.0, started + MIN_SEND_INTERVAL - loop.time()))
                except Exception:  # a bad render must not stop live updates for everyone
                    log.exception("live relay tick failed")
                    await asyncio.sleep(1)
        finally:
            if listener is not None:
                await listener.close()

    async def _tick(self) -> bool:
        """Relay what changed since the last tick; True if anything was sent."""
        changes = await database_sync_to_async(read_changes)(self.last_id)
        self.last_id = changes.last_id
        if not changes or not self.watchers:
            return False
        rendered = await sync_to_async(_render_all, thread_sensitive=True)(list(self.watchers), changes)
        for group, html in rendered.items():
            for subscriber in list(self.watchers.get(group, ())):
                try:
                    await subscriber.send(text_data=html)
                except Exception:  # a socket that went away mid-send must not stop the others
                    log.debug("live send failed", exc_info=True)
            self.sent += 1
        return bool(rendered)


class _PgListener:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @classmethod
    async def open(cls) -> _PgListener | None:
        import psycopg

        params = connections["default"].get_connection_params()
        keys = ("dbname", "user", "password", "host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey")
        try:
            conn = await psycopg.AsyncConnection.connect(
                autocommit=True, **{k: v for k, v in params.items() if k in keys and v}
            )
            await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error:
            log.warning("LISTEN failed; the live relay polls once a second instead", exc_info=True)
            return None
        return cls(conn)

    async def wait(self, timeout: float) -> None:
        # Returns at the first notification (or after the timeout); the tick reads every row since.
        async for _ in self.conn.notifies(timeout=timeout, stop_after=1):
            pass

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()


relay = Relay()
