"""Plain accessibility rules checked on the rendered pages and the stylesheet: every bar is a progressbar
with its value, and every badge's text has at least 4.5:1 contrast on its background (WCAG AA)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from migrations_app.models import JobState
from tests.support.factories import make_jobs

CSS = (Path(__file__).resolve().parents[2] / "static" / "oma.css").read_text()


def luminance(hex_color: str) -> float:
    channels = [int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(fg: str, bg: str) -> float:
    high, low = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_is_computed_as_wcag_says() -> None:
    assert round(contrast("#000000", "#ffffff"), 1) == 21.0
    assert round(contrast("#a16207", "#fef3c7"), 2) == 4.42  # the old pending badge, too faint


def test_every_badge_has_at_least_4_5_to_1() -> None:
    variables = dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})", CSS))
    rules = re.findall(r"(\.badge[^{]*)\{([^}]*)\}", CSS)
    assert len(rules) >= 5
    for selector, body in rules:
        colors = dict(re.findall(r"(background|color):\s*([^;]+);", body))
        bg = variables.get(colors["background"].strip()[6:-1], colors["background"].strip())
        fg = variables.get(colors["color"].strip()[6:-1], colors["color"].strip())
        assert contrast(fg, bg) >= 4.5, f"{selector.strip()}: {fg} on {bg} is {contrast(fg, bg):.2f}:1"


@pytest.mark.django_db
def test_every_bar_is_a_progressbar_with_its_value(viewer: Client) -> None:
    make_jobs(2, state=JobState.REPLICATING)
    for name in ("dashboard", "job-list"):
        page = viewer.get(reverse(name)).content.decode()
        bars = re.findall(r'<div class="progress[^"]*"[^>]*>', page)
        assert bars, name
        for bar in bars:
            assert 'role="progressbar"' in bar and "aria-valuenow=" in bar and "aria-label=" in bar, bar
