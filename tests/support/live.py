"""Assert what an action tells the browsers: the outbox rows it writes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.db.models import Max

from live.models import LiveUpdate


@dataclass
class Announcements:
    rows: list[tuple[str, int | None]] = field(default_factory=list)

    @property
    def topics(self) -> set[str]:
        return {topic for topic, _ in self.rows}

    def keys(self, topic: str) -> set[int | None]:
        return {key for t, key in self.rows if t == topic}


@contextmanager
def announced() -> Iterator[Announcements]:
    """``with announced() as got: cancel_job(...)``, then ``got.topics == {"job"}``."""
    before = LiveUpdate.objects.aggregate(last=Max("id"))["last"] or 0
    got = Announcements()
    yield got
    got.rows = list(LiveUpdate.objects.filter(id__gt=before).order_by("id").values_list("topic", "key"))
