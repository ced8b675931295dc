"""Rendering shared by the list pages."""

from __future__ import annotations

from typing import Any

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
