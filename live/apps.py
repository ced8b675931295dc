from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class LiveConfig(AppConfig):
    """Live updates: the outbox, the per-process relay and the websocket consumer (docs/live-updates.md).
    Transport only: the pages are registered by the apps that own them, in their ``live.py``."""

    name = "live"
    verbose_name = "Live updates"

    def ready(self) -> None:
        autodiscover_modules("live")
