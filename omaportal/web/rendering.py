"""Rendering shared by the list pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.paginator import Page, Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers


def render_page_or_partial(request: HttpRequest, template: str, partial: str, context: dict[str, Any]) -> HttpResponse:
    """The whole page, or only its ``partial`` (a template partial: the table) when htmx asks for it
    (a filter or a page link swaps the table, not the page). htmx restoring its history asks for the
    whole page. ``Vary: HX-Request``: a browser cache never answers a page with the fragment of the
    same URL (Back after filtering)."""
    htmx = getattr(request, "htmx", None)
    partial_only = bool(htmx) and not getattr(htmx, "history_restore_request", False)
    response = render(request, f"{template}#{partial}" if partial_only else template, context)
    patch_vary_headers(response, ["HX-Request"])
    return response


PER_PAGE_CHOICES = (25, 50, 100)


@dataclass(frozen=True)
class ListView:
    """A list page's order and page size as the request asks for them: ``?sort=KEY`` (``-KEY`` for
    descending) among the page's ``sorts`` (key -> ORM ordering), and ``?per_page=`` among
    PER_PAGE_CHOICES. Anything else falls back to the defaults."""

    sort: str
    per_page: int

    @classmethod
    def of(cls, request: HttpRequest, sorts: dict[str, str], default: str, per_page: int = 25) -> ListView:
        asked = request.GET.get("sort", default)
        sort = asked if asked.lstrip("-") in sorts else default
        try:
            size = int(request.GET.get("per_page", per_page))
        except ValueError:
            size = per_page
        return cls(sort, size if size in PER_PAGE_CHOICES else per_page)

    def order(self, sorts: dict[str, str]) -> list[str]:
        field = sorts[self.sort.lstrip("-")]
        descending = self.sort.startswith("-")
        return [f"-{field}" if descending else field, "-pk" if descending else "pk"]

    def paginate(self, request: HttpRequest, queryset: Any, sorts: dict[str, str]) -> Page:
        return Paginator(queryset.order_by(*self.order(sorts)), self.per_page).get_page(request.GET.get("page"))
