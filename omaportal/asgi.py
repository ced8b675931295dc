"""ASGI entry point (daphne): HTTP, and the live-update websocket behind origin validation and login."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omaportal.settings")

from django.core.asgi import get_asgi_application

http_app = get_asgi_application()  # sets Django up before the imports below touch models

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path  # noqa: E402

from live.consumers import LiveConsumer  # noqa: E402

if settings.OMA_SERVE_STATIC:
    # The embedded appliance serves its own assets (no CDN, maybe offline); production uses the proxy.
    http_app = ASGIStaticFilesHandler(http_app)

websocket_urls = [path("ws/live/", LiveConsumer.as_asgi())]

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urls))),
    }
)
