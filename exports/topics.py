"""The live-update topic the exports announce (``live.outbox.announce``); the NBD page listens to it."""

NBD = "nbd"  # an export was written, retired or found missing; the server reloaded, restarted or crashed
