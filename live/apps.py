from django.apps import AppConfig


class LiveConfig(AppConfig):
    """Live updates: the outbox, the per-process relay and the websocket consumer (DESIGN.md, "Live
    updates")."""

    name = "live"
    verbose_name = "Live updates"
