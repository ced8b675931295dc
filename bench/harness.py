"""What the benchmarks share: percentiles, a scratch PostgreSQL database, the portal's environment for a
dev NBD layout, and the helper run the way the portal runs it. Benchmarks run as modules from the
repository root (``python -m bench.migration_e2e``), so they import this and the portal directly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from devtools.devserver import VMA_IDENTITY, DevServerLayout, libnbd_tls_query
from devtools.vma_sim import digest_of

REPO = Path(__file__).resolve().parent.parent


HELPER = [sys.executable, "-IS", str(REPO / "deploy" / "oma-nbd-helper")]


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return round(ordered[index], 2)


def sha(path: Path, length: int) -> str:
    """The sha256 of a file's first ``length`` bytes (a volume against its source image)."""
    return digest_of(path, [[0, length]])["value"]


def helper(layout: DevServerLayout, *args: str) -> dict[str, Any]:
    env = {**os.environ, "OMA_NBD_HELPER_CONFIG": str(layout.helper_config)}
    proc = subprocess.run([*HELPER, *args], capture_output=True, text=True, env=env, check=False)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def nbd_target(layout: DevServerLayout, name: str, port: int | None = None) -> str:
    """An nbdcopy URI for export ``name``: over TLS with the simulated VMA's key when the layout has TLS."""
    port = port or layout.port
    if not layout.tls:
        return f"nbd://127.0.0.1:{port}/{name}"
    return f"nbds://{VMA_IDENTITY}@127.0.0.1:{port}/{name}?{libnbd_tls_query(layout.vma_tls)}"


def portal_env(layout: DevServerLayout, var_dir: Path, spacing: float, database_url: str | None) -> dict[str, str]:
    env = {
        "DJANGO_SETTINGS_MODULE": "omaportal.settings",
        "OMA_VAR_DIR": str(var_dir),
        "OMA_NBD_BACKEND": layout.backend,
        "OMA_NBD_HOST": layout.host,
        "OMA_NBD_PORT": str(layout.port),
        "OMA_NBD_HELPER": " ".join(HELPER),
        "OMA_NBD_HELPER_CONFIG": str(layout.helper_config),
        "OMA_NBD_EXPORT_ROOT": str(layout.export_root),
        "OMA_NBD_STATE_DIR": str(layout.state_dir),
        "OMA_NBD_MIN_RELOAD_SPACING": str(spacing),
        **layout.settings_env(),
        "OMA_VMA_NBD_TLS": "1" if layout.tls else "0",
        "OMA_LOG_LEVEL": "WARNING",
    }
    if database_url:
        env["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
    return env


def worker_init(env: dict[str, str]) -> None:
    os.environ.update(env)
    import django

    django.setup()


def scratch_postgres(url: str) -> tuple[str, Any]:
    import psycopg

    name = f"oma_bench_{os.getpid()}"
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from django.db import connections

        connections.close_all()
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

    return url.rsplit("/", 1)[0] + f"/{name}", drop


def start_oma(env: dict[str, str], log: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """The OMA's background processes, as the Procfile runs them: the django-q2 cluster and the progress
    follower, each in its own process group."""
    out = log.open("ab") if log else subprocess.DEVNULL
    return [
        subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), command],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            start_new_session=True,
        )
        for command in ("run_workers", "run_follower")
    ]


def stop_oma(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
