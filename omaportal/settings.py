"""Settings for the OMA portal.

Everything that differs between the embedded default (``make demo``: SQLite, nbdkit, files under
``var/``) and a production OMA (PostgreSQL, sudo helper, systemd NBD server) comes from the
environment, so one settings module serves both.
"""

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("OMA_VAR_DIR", BASE_DIR / "var")).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def generated_secret(path: Path) -> str:
    """This installation's own secret key, made on first use and kept (mode 0600) under the var folder:
    no key is ever shipped. Created atomically, so processes starting together agree on one."""
    if not path.exists():
        from django.core.management.utils import get_random_secret_key

        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(get_random_secret_key() + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first; then theirs is the key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


# Off unless asked: a malformed answer must never show a debug page (the demo and the browser tests ask).
DEBUG = env_bool("DJANGO_DEBUG", False)
# Daphne serves the static files itself (no proxy: the demo, the browser tests); behind nginx it does not.
OMA_SERVE_STATIC = env_bool("OMA_SERVE_STATIC", DEBUG)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or generated_secret(
    Path(os.environ.get("OMA_SECRET_KEY_FILE", VAR_DIR / "secret_key"))
)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

# --- Behind the TLS proxy (deploy/nginx): all settable from the environment ------------------------
# The proxy terminates TLS and says so in X-Forwarded-Proto; only set OMA_BEHIND_PROXY when it does.
if env_bool("OMA_BEHIND_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("OMA_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = env_bool("OMA_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = int(os.environ.get("OMA_HSTS_SECONDS", "0"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("OMA_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("OMA_HSTS_PRELOAD", True)
CSRF_TRUSTED_ORIGINS = env_list("OMA_CSRF_TRUSTED_ORIGINS")
SESSION_COOKIE_AGE = int(os.environ.get("OMA_SESSION_SECONDS", str(8 * 60 * 60)))  # a working day
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Scripts only from the portal itself (htmx and oma.js are local files); progress bars set their width
# in a style attribute, hence inline styles.
from django.utils.csp import CSP  # noqa: E402

SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "channels",
    "django_q",
    "omaportal.web",
    "live",
    "exports",
    "migrations_app",
    "devtools",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "omaportal.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = "omaportal.wsgi.application"
ASGI_APPLICATION = "omaportal.asgi.application"
# No CHANNEL_LAYERS: each web process runs its own live relay over the database outbox and writes to
# its own sockets (live/relay.py), so nothing crosses processes through a channel layer.

# DATABASE_URL selects PostgreSQL (psycopg 3); without it SQLite in WAL mode under var/.
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "oma.sqlite3"),
            "OPTIONS": {
                # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the busy
                # timeout instead of failing with "database is locked" on lock upgrade.
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file, not :memory:, so tests with threads and subprocesses share one database.
            "TEST": {"NAME": str(VAR_DIR / "test-oma.sqlite3")},
            # Reuse connections (the live relay reads every 50 ms; a new SQLite connection runs its PRAGMAs).
            "CONN_MAX_AGE": 60,
        }
    }
# Lets a worker process started by a test (or a second instance) use one named database.
if os.environ.get("OMA_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["OMA_DB_NAME"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"

# Tasks are short steps (no task waits for a copy: the progress follower does), so two workers serve
# many concurrent migrations. The timeout covers the slowest step: a CloudStack job (OMA_CLOUDSTACK_JOB_
# TIMEOUT, 300 s) per disk; "retry" must exceed it.
_Q_TIMEOUT = int(os.environ.get("OMA_Q_TIMEOUT", "900"))
# This OMA node's name: its attach slots, volumes, jobs, NBD server state and task queue carry it.
_NODE_NAME = os.environ.get("OMA_NODE_NAME", "local")
Q_CLUSTER = {
    # One queue per OMA node: a job's steps attach volumes and publish exports on the node it was placed
    # on, so only that node's workers may take them (the node's follower queues them under this name).
    "name": f"oma-{_NODE_NAME}",
    "orm": "default",
    "workers": int(os.environ.get("OMA_Q_WORKERS", "4")),
    "timeout": _Q_TIMEOUT,
    "retry": _Q_TIMEOUT + 60,
    "catch_up": False,
    # ORM broker: how often an idle worker looks for queued tasks (a job waits at most this long), and how
    # many it takes per look (a burst of dispatched jobs is picked up at once, not one per poll).
    "poll": 0.05,
    "bulk": 4,
    # Every finished task's row is kept, and pruned by age with the rest of the history
    # (OMA_RETENTION_DAYS). django-q2's default keeps the last 250 instead: to save each task it reads
    # and locks all 250 (on SQLite under the write lock every worker and the follower wait for).
    "save_limit": 0,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler", "stream": sys.stderr}},
    "root": {"handlers": ["console"], "level": os.environ.get("OMA_LOG_LEVEL", "INFO")},
}

# --- The shared NBD server -----------------------------------------------------------------
# The helper reads its paths from its own root-owned config; the portal only needs to know how to
# call it and where to read (never write) the export links and the server's address.
_NBD_DIR = VAR_DIR / "nbd"
OMA_NBD: dict[str, Any] = {
    # "nbdkit" (default, zero reloads) or "nbd-server" (conf.d + coalesced SIGHUP reloads).
    "BACKEND": os.environ.get("OMA_NBD_BACKEND", "nbdkit"),
    "HOST": os.environ.get("OMA_NBD_HOST", "127.0.0.1"),
    "PORT": int(os.environ.get("OMA_NBD_PORT", "10809")),
    # Production: "sudo -n /usr/local/libexec/oma/oma-nbd-helper". Dev runs the same program.
    "HELPER_COMMAND": shlex.split(
        os.environ.get("OMA_NBD_HELPER", f"{shlex.quote(sys.executable)} -IS {BASE_DIR / 'deploy' / 'oma-nbd-helper'}")
    ),
    # Passed to the helper only in dev mode (the helper ignores it under sudo).
    "HELPER_CONFIG": os.environ.get("OMA_NBD_HELPER_CONFIG", str(_NBD_DIR / "helper.conf")),
    "EXPORT_ROOT": os.environ.get("OMA_NBD_EXPORT_ROOT", str(_NBD_DIR / "exports")),
    "STATE_DIR": os.environ.get("OMA_NBD_STATE_DIR", str(_NBD_DIR / "portal")),
    # Minimum seconds between two SIGHUPs to nbd-server (3.24 corrupts memory on rapid reloads).
    "MIN_RELOAD_SPACING": float(os.environ.get("OMA_NBD_MIN_RELOAD_SPACING", "2.0")),
    # How long a new export may take to appear before ensure_export gives up.
    "SERVE_TIMEOUT": float(os.environ.get("OMA_NBD_SERVE_TIMEOUT", "15")),
    "NODE": _NODE_NAME,
    # NBD over TLS, the portal's own credentials for its health probes and verification reads (readable
    # only by the portal's user). nbdkit (--tls=require, pre-shared keys): a psktool-format key file.
    # nbd-server (force_tls, certificates): a folder with ca-cert.pem, client-cert.pem, client-key.pem.
    # Empty: the server speaks plain NBD.
    "TLS_PSK_FILE": os.environ.get(
        "OMA_NBD_TLS_PSK_FILE",
        str(_NBD_DIR / "portal.psk") if os.environ.get("OMA_NBD_BACKEND", "nbdkit") == "nbdkit" else "",
    ),
    "TLS_CERT_DIR": os.environ.get(
        "OMA_NBD_TLS_CERT_DIR",
        str(_NBD_DIR / "portal-x509") if os.environ.get("OMA_NBD_BACKEND", "nbdkit") == "nbd-server" else "",
    ),
    "TLS_IDENTITY": os.environ.get("OMA_NBD_TLS_IDENTITY", "oma-portal"),
}

# --- The shared cache: login throttling counters seen by every web process (and node) -------------
# A database table (made by a migration), so every process on every node shares it with no extra service.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "oma_cache"}}
# Addresses (or networks) of reverse proxies whose X-Forwarded-For names the client (nginx on the OMA).
OMA_TRUSTED_PROXIES = env_list("OMA_TRUSTED_PROXIES")
# Prometheus scrapes /metrics with this bearer token (empty: only logged-in viewers may read it).
OMA_METRICS_TOKEN = os.environ.get("OMA_METRICS_TOKEN", "")
# Job and export events, login records and finished task rows older than this are pruned (the follower
# does it hourly; manage.py prune_history by hand).
OMA_RETENTION_DAYS = int(os.environ.get("OMA_RETENTION_DAYS", "180"))
# An open live socket re-checks its session, its user and its role this often.
OMA_LIVE_RECHECK_SECONDS = float(os.environ.get("OMA_LIVE_RECHECK_SECONDS", "5"))

# The operator GUI's own login page (omaportal/web/auth.py, throttled) serves every role.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# --- Migrations: destination volumes, the VMA agent, the workflow ---------------------------
OMA_VOLUMES: dict[str, Any] = {
    # "local" (sparse files under the helper's dev volume root) or "cloudstack"
    "BACKEND": os.environ.get("OMA_VOLUME_BACKEND", "local"),
    "ROOT": os.environ.get("OMA_VOLUME_ROOT", str(_NBD_DIR / "volumes")),
    "LOOP": env_bool("OMA_VOLUME_LOOP", False),
    # This node's by-id links (blank: <ROOT>/by-id). OMA nodes sharing one volume root each need their own.
    "DEVICE_ROOT": os.environ.get("OMA_VOLUME_DEVICE_ROOT", ""),
    "CLOUDSTACK": {
        "ENDPOINT": os.environ.get("OMA_CLOUDSTACK_ENDPOINT", ""),
        "KEY": os.environ.get("OMA_CLOUDSTACK_KEY", ""),
        "SECRET": os.environ.get("OMA_CLOUDSTACK_SECRET", ""),
        "ZONE_ID": os.environ.get("OMA_CLOUDSTACK_ZONE_ID", ""),
        "DISK_OFFERING_ID": os.environ.get("OMA_CLOUDSTACK_DISK_OFFERING_ID", ""),
        "OMA_VM_ID": os.environ.get("OMA_CLOUDSTACK_OMA_VM_ID", ""),
        "JOB_TIMEOUT": int(os.environ.get("OMA_CLOUDSTACK_JOB_TIMEOUT", "300")),
        "POLL_INTERVAL": float(os.environ.get("OMA_CLOUDSTACK_POLL_INTERVAL", "2.0")),
        "DEVICE_ROOT": os.environ.get("OMA_CLOUDSTACK_DEVICE_ROOT", "/dev/disk/by-id"),
        # The owner tag on every volume this portal creates (default: oma-portal:<OMA VM id>).
        "OWNER": os.environ.get("OMA_CLOUDSTACK_OWNER", ""),
        # The destination VMs' hypervisor: a root volume moves between VMs only on KVM, XenServer or VMware.
        "HYPERVISOR": os.environ.get("OMA_CLOUDSTACK_HYPERVISOR", "KVM"),
    },
}
# Failover (docs/failover.md): how long a guest shutdown and a start may take, and the defaults of a
# test failover (its network when a mapping names none, and how long it runs before it ends itself).
OMA_FAILOVER: dict[str, Any] = {
    "SHUTDOWN_TIMEOUT": int(os.environ.get("OMA_FAILOVER_SHUTDOWN_TIMEOUT", "300")),
    "START_TIMEOUT": int(os.environ.get("OMA_FAILOVER_START_TIMEOUT", "600")),
    "TEST_NETWORK_ID": os.environ.get("OMA_FAILOVER_TEST_NETWORK_ID", ""),
    "TEST_MINUTES": int(os.environ.get("OMA_FAILOVER_TEST_MINUTES", "120")),
    # A completed sync older than this is a warning before a failover (the final sync carries more).
    "SYNC_AGE_WARN_HOURS": int(os.environ.get("OMA_FAILOVER_SYNC_AGE_WARN_HOURS", "24")),
}
OMA_VMA: dict[str, Any] = {
    "URL": os.environ.get("OMA_VMA_URL", "http://127.0.0.1:9780"),
    "TOKEN": os.environ.get("OMA_VMA_TOKEN", "oma-demo-vma-token"),
    "TIMEOUT": float(os.environ.get("OMA_VMA_TIMEOUT", "10")),
    "RETRIES": int(os.environ.get("OMA_VMA_RETRIES", "3")),
    # One call in all, however slowly the VMA sends; plain http:// only to a VMA on this host.
    "DEADLINE": float(os.environ.get("OMA_VMA_DEADLINE", "30")),
    "CA_FILE": os.environ.get("OMA_VMA_CA_FILE", ""),
    # The NBD address the VMA copies to (production: its end of the TLS tunnel, 127.0.0.1:10808).
    "NBD_HOST": os.environ.get("OMA_VMA_NBD_HOST", OMA_NBD["HOST"]),
    "NBD_PORT": int(os.environ.get("OMA_VMA_NBD_PORT", str(OMA_NBD["PORT"]))),
    # nbds:// URLs with this identity (the VMA holds its key or certificate); off behind the stunnel pair.
    "NBD_TLS": env_bool("OMA_VMA_NBD_TLS", bool(OMA_NBD["TLS_PSK_FILE"] or OMA_NBD["TLS_CERT_DIR"])),
    "NBD_IDENTITY": os.environ.get("OMA_VMA_NBD_IDENTITY", "vma"),
}
OMA_WORKFLOW: dict[str, Any] = {
    "MAX_ACTIVE_JOBS": int(os.environ.get("OMA_MAX_ACTIVE_JOBS", "25")),
    # Attach slots of this node (OMA_MAX_ATTACHED_VOLUMES is the older name of the same limit).
    "ATTACH_SLOTS": int(os.environ.get("OMA_ATTACH_SLOTS", os.environ.get("OMA_MAX_ATTACHED_VOLUMES", "25"))),
    "POLL_INTERVAL": float(os.environ.get("OMA_PROGRESS_POLL_INTERVAL", "0.5")),
    "HEARTBEAT_STALE_SECONDS": float(os.environ.get("OMA_HEARTBEAT_STALE_SECONDS", "60")),
    # An unexpected error in a step: tried again after this many seconds, then twice as long, then failed.
    "STEP_RETRY_SECONDS": float(os.environ.get("OMA_STEP_RETRY_SECONDS", "5")),
    # A sync completes only after the portal re-read what the VMA wrote and it matched the VMA's digest.
    "VERIFY_WRITES": env_bool("OMA_VERIFY_WRITES", True),
    # A copy cut by an outage (the VMA, the network, the NBD server) is resumed from its checkpoint for
    # this long, backing off, before its job fails.
    "OUTAGE_WINDOW_SECONDS": float(os.environ.get("OMA_OUTAGE_WINDOW_SECONDS", "600")),
}
