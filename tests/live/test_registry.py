"""The page registry: the apps' pages are found at startup, and a group renders only when a topic of
its page changed."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from live import registry
from live.registry import Changes, Group, LivePage


def test_the_apps_pages_are_discovered_from_their_live_modules() -> None:
    assert {page.name for page in registry.pages()} >= {"dashboard", "jobs", "job", "inventory", "nbd"}
    assert registry.page("job") is not None and registry.page("job").keyed  # type: ignore[union-attr]
    assert registry.page("secrets") is None


def test_a_second_page_with_the_same_name_is_refused() -> None:
    dashboard = registry.page("dashboard")
    assert dashboard is not None
    clash = LivePage("dashboard", frozenset({"other"}), dashboard.audience, dashboard.render)
    with pytest.raises(ImproperlyConfigured, match="registered twice"):
        registry.register(clash)
    assert registry.page("dashboard") is dashboard


def test_a_group_renders_nothing_unless_one_of_its_topics_changed(request: pytest.FixtureRequest) -> None:
    calls: list[Changes | None] = []

    def render(changes: Changes | None, role: str, key: int | None) -> list[str]:
        calls.append(changes)
        return [f"<p>{role} {key}</p>"]

    registry.register(LivePage("test-page", frozenset({"t1"}), lambda user: "viewer", render))
    request.addfinalizer(lambda: registry.unregister("test-page"))
    group = Group("test-page", "viewer", 7)
    unrelated = Changes(1)
    unrelated.add("t2", 7)
    related = Changes(2)
    related.add("t1", None)
    assert registry.render_group(group, unrelated) == ""
    assert registry.render_group(group, related) == "<p>viewer 7</p>"
    assert registry.render_group(group, None) == "<p>viewer 7</p>"  # a snapshot always renders
    assert calls == [related, None]
    assert registry.render_group(Group("no-such-page", "viewer"), None) == ""


def test_changes_keep_keys_per_topic() -> None:
    changes = Changes(0)
    assert not changes
    changes.add("job", 1)
    changes.add("job", 2)
    changes.add("progress", 3)
    changes.add("nbd", None)
    assert changes and "nbd" in changes and "inventory" not in changes
    assert (
        changes.keys("job") == {1, 2} and changes.keys("job", "progress") == {1, 2, 3} and changes.keys("nbd") == set()
    )
