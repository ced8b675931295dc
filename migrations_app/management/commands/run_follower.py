import logging
import signal
import time
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from migrations_app.conf import workflow_conf
from migrations_app.follower import Follower, Lease, follower_id
from migrations_app.retention import Pruner

log = logging.getLogger("migrations_app.follower")
BUSY_INTERVAL = 0.1


class Command(BaseCommand):
    help = (
        "The progress follower of this OMA node: follows every copy at the VMA, dispatches pending jobs "
        "with their attach slots, recovers silent workers and starts due warm syncs. One per node (it holds "
        "a lease on the node's row); production runs it as a systemd unit, the demo from the Procfile."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--interval", type=float, help="seconds between ticks (default: the poll interval)")
        parser.add_argument("--once", action="store_true", help="one tick, then exit")

    def handle(self, *args: Any, **options: Any) -> None:
        interval = options["interval"] or workflow_conf().poll_interval
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        holder = follower_id()
        follower = Follower()
        lease = Lease(follower.node, holder)
        pruner = Pruner()  # history past OMA_RETENTION_DAYS, hourly, by whichever follower holds its lease
        waiting_said = False
        try:
            while not stopping:
                started = time.monotonic()
                try:
                    busy = False
                    if lease.hold():
                        busy = follower.tick().changed
                        waiting_said = False
                        pruned = pruner.maybe()
                        if pruned and any(pruned.values()):
                            log.info("pruned history: %s", pruned)
                    elif not waiting_said:
                        self.stderr.write(f"another follower holds node {follower.node.name}; standing by")
                        waiting_said = True
                except Exception:
                    # A locked or restarting database, or one job's bad data, must not stop the follower
                    # from following every other copy: it logs and tries again next tick.
                    log.exception("follower tick failed; trying again")
                    close_old_connections()
                if options["once"]:
                    break
                # While work flows (a copy ended, a job was placed, a volume is being detached), the next
                # tick comes at once: a freed slot is used within a fraction of a second.
                pause = BUSY_INTERVAL if busy else interval
                if follower.wake.wait(max(0.0, started + pause - time.monotonic())):
                    follower.wake.clear()  # the placer thread could not place: this tick does
        finally:
            lease.drop()
            follower.close()
