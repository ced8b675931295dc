import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand

# A stopping cluster finishes the steps in hand (short ones), then is killed.
STOP_GRACE_SECONDS = 15
PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the cluster's main process before it runs: if this wrapper dies (even by SIGKILL), the kernel
    sends the cluster SIGTERM, its orderly stop, so it is never left running on its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Command(BaseCommand):
    help = (
        "The django-q2 worker cluster (manage.py qcluster), stopped cleanly by SIGTERM to this process's "
        "group, as honcho and systemd send it: the cluster runs in its own session and only its main "
        "process is told to stop (a group SIGTERM reaching its sentinel and workers directly can leave it "
        "hanging); after a grace period it is killed."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        manage = Path(sys.argv[0]).resolve() if sys.argv[0].endswith("manage.py") else Path("manage.py").resolve()
        cluster = subprocess.Popen(  # noqa: S603 - this Python, this project's manage.py
            [sys.executable, str(manage), "qcluster"], start_new_session=True, preexec_fn=_stop_with_parent
        )
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while cluster.poll() is None and not stopping:
            time.sleep(0.2)
        if cluster.poll() is None:
            cluster.send_signal(signal.SIGTERM)  # the main process only: its orderly stop
            try:
                cluster.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.stderr.write(f"the cluster did not stop within {STOP_GRACE_SECONDS} s; killing it")
        # Whatever of the cluster's session is left (a worker in a long step, a stuck sentinel) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait()
        sys.exit(0 if stopping else cluster.returncode)
