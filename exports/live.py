"""The NBD server page, live: its counters, health and recent events whenever an export or the server
changes (topic ``nbd``)."""

from __future__ import annotations

from collections.abc import Iterable

from django.template.loader import render_to_string

from live.registry import Changes, LivePage, register
from omaportal.web.roles import live_role

from .pages import nbd_context
from .topics import NBD


def render_nbd(changes: Changes | None, role: str, key: int | None) -> Iterable[str]:
    return [render_to_string("exports/nbd_server.html#nbd-live", nbd_context())]


register(LivePage("nbd", frozenset({NBD}), live_role, render_nbd))
