"""Human units for the dashboard: sizes in binary units, rates in MB/s, "2 min left", sparklines."""

from __future__ import annotations

import datetime as dt
from datetime import datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

register = template.Library()


@register.filter
def bytes_human(value: int | None) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # unreachable


@register.filter
def rate_human(bits_or_bytes_per_second: int | None) -> str:
    """Bytes per second as MB/s (decimal, as copy tools report it)."""
    rate = float(bits_or_bytes_per_second or 0)
    if rate <= 0:
        return "\u2013"
    if rate < 1e6:
        return f"{rate / 1e3:.0f} kB/s"
    return f"{rate / 1e6:.1f} MB/s" if rate < 1e8 else f"{rate / 1e6:.0f} MB/s"


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min"


@register.filter
def eta(job_progress: dict[str, int]) -> str:
    """'2 min left' from remaining bytes and the current rate."""
    remaining = job_progress.get("total", 0) - job_progress.get("done", 0)
    rate = job_progress.get("rate", 0)
    if remaining <= 0:
        return "finishing"
    if rate <= 0:
        return "estimating…"
    return f"{_span(remaining / rate)} left"


@register.filter
def duration_ms(value: int | None) -> str:
    if value is None:
        return ""
    if value < 1000:
        return f"{value} ms"
    return f"{value / 1000:.1f} s" if value < 60_000 else _span(value / 1000)


@register.filter
def since(value: datetime | None) -> str:
    if value is None:
        return "never"
    return _span((timezone.now() - value).total_seconds())


@register.filter
def percent(done: int | None, total: int | None) -> int:
    if not total:
        return 0
    return max(0, min(100, int((done or 0) * 100 / total)))


@register.simple_tag
def sparkline(samples: list[float] | None, width: int = 120, height: int = 24) -> SafeString:
    """A throughput sparkline as inline SVG (no JavaScript, no external asset)."""
    values = [float(v) for v in (samples or [])][-40:]
    if len(values) < 2:
        return mark_safe("")  # nothing to draw yet
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values))
    return format_html(
        '<svg class="spark" width="{}" height="{}" viewBox="0 0 {} {}" role="img" aria-label="throughput">'
        '<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{}"/></svg>',
        width,
        height,
        width,
        height,
        points,
    )


@register.simple_tag(takes_context=True)
def sort_header(context: dict[str, Any], key: str, label: str) -> SafeString:
    """A column header that sorts its list: a link to the same filters ordered by ``key`` (again: the
    other way round), with aria-sort saying how it is sorted now."""
    request = context["request"]
    current = context.get("sort", "")
    query = request.GET.copy()
    query.pop("page", None)
    ascending_now = current == key
    query["sort"] = f"-{key}" if ascending_now else key
    state = "ascending" if current == key else "descending" if current == f"-{key}" else "none"
    arrow = {"ascending": " ▲", "descending": " ▼", "none": ""}[state]
    return format_html(
        '<th aria-sort="{}"><a class="sort" href="?{}">{}{}</a></th>', state, query.urlencode(), label, arrow
    )


@register.filter
def when(value: datetime | None, empty: str = "\u2013") -> SafeString:
    """A moment as <time>: UTC with the zone named on the server; the page's script shows it in the
    viewer's own zone (the zone named too)."""
    if value is None:
        return format_html("{}", empty)
    utc = value.astimezone(dt.UTC)
    return format_html('<time datetime="{}">{} UTC</time>', utc.isoformat(), utc.strftime("%Y-%m-%d %H:%M:%S"))
