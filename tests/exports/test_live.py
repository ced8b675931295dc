"""The NBD server page's live side: every export event announces it, and its render cost is flat."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from exports.actions import record_event
from exports.topics import NBD
from live import registry
from live.registry import Changes, Group
from tests.support.live import announced

pytestmark = pytest.mark.django_db


def test_an_export_event_announces_the_nbd_topic() -> None:
    with announced() as got:
        record_event("export.created", export_name="migration-vm-x-disk0", message="test")
    assert got.topics == {NBD}


def test_the_nbd_page_renders_in_a_fixed_number_of_queries() -> None:
    changes = Changes(0)
    changes.add(NBD, None)
    counts = []
    for n in (3, 30):
        for i in range(n):
            record_event("export.created", export_name=f"e{i}")
            record_event("server.reload", message="1 reload(s)")
        with CaptureQueriesContext(connection) as ctx:
            html = registry.render_group(Group("nbd", "viewer"), changes)
        assert 'id="nbd-live"' in html
        counts.append(len(ctx.captured_queries))
    assert counts[0] == counts[1] <= 4, counts
