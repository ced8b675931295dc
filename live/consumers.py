"""The one websocket: find the page in the registry, ask it who may watch and in which role, join the
page's group in this process's relay, send a fresh snapshot, then receive the fragments the relay
renders. A reconnect is a new connect, so it always starts from a snapshot.

The socket's query says what it watches: ``?page=NAME`` and, for a page about one object, ``&key=ID``
(the page resolves it, e.g. a job id to its row)."""

from __future__ import annotations

import asyncio
import contextlib
from importlib import import_module
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user

from . import registry
from .registry import Group
from .relay import relay

# Application close codes (4000-4999): the page shows "signed out" instead of reconnecting forever.
CLOSE_NOT_ALLOWED = 4403
CLOSE_UNKNOWN_PAGE = 4404  # no such page, or no such object: nothing would ever be sent
CLOSE_ROLE_CHANGED = 4409  # still allowed, in another role: the page reconnects for the right fragments


def recheck_seconds() -> float:
    """How often an open socket checks that its session and role still hold (logout, deactivation, a
    role taken away all close it within this time)."""
    return float(getattr(settings, "OMA_LIVE_RECHECK_SECONDS", 5.0))


def still_allowed(session_key: str | None, user_pk: Any, group: Group) -> int | None:
    """None while the socket may go on; else the close code. The session is read afresh from its store
    (a logout deletes it) and the user afresh from the database (inactive users do not authenticate)."""
    if not session_key:
        return CLOSE_NOT_ALLOWED
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]
    if not user.is_authenticated or user.pk != user_pk:
        return CLOSE_NOT_ALLOWED
    page = registry.page(group.page)
    role = page.audience(user) if page is not None else None
    if role is None:
        return CLOSE_NOT_ALLOWED
    return None if role == group.role else CLOSE_ROLE_CHANGED


def group_for(user: Any, page_name: str, key_text: str | None) -> Group | int:
    """The group this user watches for the request, or the close code that refuses it."""
    page = registry.page(page_name)
    if page is None:
        return CLOSE_UNKNOWN_PAGE
    role = page.audience(user)
    if role is None:
        return CLOSE_NOT_ALLOWED
    key = None
    if page.resolve_key is not None:
        key = page.resolve_key(key_text) if key_text else None
        if key is None:
            return CLOSE_UNKNOWN_PAGE
    return Group(page.name, role, key)


class LiveConsumer(AsyncWebsocketConsumer):
    groups_joined: list[Group]

    async def connect(self) -> None:
        self.groups_joined = []
        query = parse_qs(self.scope.get("query_string", b"").decode("ascii", "replace"))
        page = query.get("page", ["dashboard"])[0]
        key = query.get("key", [None])[0]
        group = await database_sync_to_async(group_for)(self.scope.get("user"), page, key)
        if not isinstance(group, Group):
            await self.close(code=group)
            return
        await self.accept()
        # Join first, then snapshot: a change in between is sent after the snapshot, never lost.
        relay.watch(group, self)
        self.groups_joined.append(group)
        await relay.ensure_started()
        html = await relay.snapshot(group)
        if html:
            await self.send(text_data=html)
        session = self.scope.get("session")
        user = self.scope.get("user")
        self.recheck = asyncio.create_task(
            self._recheck(getattr(session, "session_key", None), getattr(user, "pk", None), group)
        )

    async def _recheck(self, session_key: str | None, user_pk: Any, group: Group) -> None:
        while True:
            await asyncio.sleep(recheck_seconds())
            code = await database_sync_to_async(still_allowed)(session_key, user_pk, group)
            if code is not None:
                relay.unwatch(group, self)
                await self.close(code=code)
                return

    async def disconnect(self, code: int) -> None:
        recheck = getattr(self, "recheck", None)
        if recheck is not None and recheck is not asyncio.current_task():
            recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recheck
        for group in getattr(self, "groups_joined", []):
            relay.unwatch(group, self)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The browser only listens; anything it sends is ignored."""
