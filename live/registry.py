"""The live pages. The transport knows no page: each app registers the pages it owns in its own
``live.py`` (found by ``LiveConfig.ready()``, the way admin finds ``admin.py``), saying which outbox
topics concern the page, who may watch it in which role, and how to render its fragments.

A page is watched in groups: one per (page, role, key). The relay renders a group's fragments once per
change and writes the same HTML to every socket in the group, so a render must depend on nothing but
the role and the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured


@dataclass
class Changes:
    """What the outbox said since the last tick: topic -> keys announced with it (an empty set when the
    topic was announced without a key, as a whole)."""

    last_id: int
    topics: dict[str, set[int]] = field(default_factory=dict)

    def add(self, topic: str, key: int | None) -> None:
        keys = self.topics.setdefault(topic, set())
        if key is not None:
            keys.add(key)

    def __bool__(self) -> bool:
        return bool(self.topics)

    def __contains__(self, topic: object) -> bool:
        return topic in self.topics

    def keys(self, *topics: str) -> set[int]:
        """Every key announced under any of ``topics``."""
        found: set[int] = set()
        for topic in topics:
            found |= self.topics.get(topic, set())
        return found


# changes is None for a snapshot (every fragment of the page); otherwise only what the changes touch.
type Render = Callable[[Changes | None, str, int | None], Iterable[str]]
# The role a user watches the page in ("operator", "viewer", ...), or None: not allowed to watch it.
type Audience = Callable[[Any], str | None]
# The page's key from the socket's ``key`` parameter (a job id -> its pk), or None: no such object.
type KeyResolver = Callable[[str], int | None]


@dataclass(frozen=True)
class LivePage:
    name: str
    topics: frozenset[str]
    audience: Audience
    render: Render
    resolve_key: KeyResolver | None = None

    @property
    def keyed(self) -> bool:
        return self.resolve_key is not None


@dataclass(frozen=True)
class Group:
    """The sockets that see the same HTML: one page, one role, one key."""

    page: str
    role: str
    key: int | None = None


_pages: dict[str, LivePage] = {}


def register(page: LivePage) -> LivePage:
    if page.name in _pages and _pages[page.name] != page:
        raise ImproperlyConfigured(f"live page {page.name!r} is registered twice")
    _pages[page.name] = page
    return page


def unregister(name: str) -> None:
    _pages.pop(name, None)


def page(name: str) -> LivePage | None:
    return _pages.get(name)


def pages() -> list[LivePage]:
    return list(_pages.values())


def render_group(group: Group, changes: Changes | None) -> str:
    """One group's HTML: the page's whole snapshot (changes None), or the fragments the changes touch,
    or "" when none of the page's topics changed."""
    live_page = _pages.get(group.page)
    if live_page is None:
        return ""
    if changes is not None and not live_page.topics & changes.topics.keys():
        return ""
    return "".join(live_page.render(changes, group.role, group.key))
