"""System checks: a VMA URL that would send the token and the NBD URLs in clear is an error at start."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, register

from .conf import vma_conf
from .vma_client import VmaError, check_url


@register()
def vma_url_is_safe(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        check_url(vma_conf().url)
    except VmaError as exc:
        return [Error(exc.message, hint="Set OMA_VMA_URL to an https:// URL (OMA_VMA_CA_FILE for a private CA).",
                      id="oma.E001")]  # fmt: skip
    return []
