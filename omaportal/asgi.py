"""ASGI entry point (daphne). Websocket routes join with the live dashboard."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omaportal.settings")

from channels.routing import ProtocolTypeRouter
from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

http_app = get_asgi_application()
if settings.DEBUG:
    # The embedded appliance serves its own assets (no CDN, maybe offline); production uses the proxy.
    http_app = ASGIStaticFilesHandler(http_app)

application = ProtocolTypeRouter({"http": http_app})
