#!/usr/bin/env bash
# Install the OMA portal on a Debian 12 OMA, from a checkout of this repository:
#
#   sudo PYTHON=/opt/python3.13/bin/python3.13 deploy/install.sh
#
# Idempotent: run it again after `git pull` to upgrade (configs and keys that exist are kept).
# --files-only --root DIR lays the files out under DIR and does nothing else (no packages, users,
# services or database): what the tests check, and a way to review what an install writes.
set -euo pipefail

ROOT=""
FILES_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="${2%/}"; shift 2 ;;
    --files-only) FILES_ONLY=1; shift ;;
    *) echo "usage: $0 [--files-only --root DIR]" >&2; exit 2 ;;
  esac
done
if [ -n "$ROOT" ] && [ "$FILES_ONLY" = 0 ]; then
  echo "--root needs --files-only: services, users and the database are set up on / only" >&2; exit 2
fi
[ "$(id -u)" = 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="$ROOT/opt/oma"
say() { printf '== %s\n' "$*"; }
owned() { [ "$FILES_ONLY" = 1 ] || chown "$@"; }

if [ "$FILES_ONLY" = 0 ]; then
  say "Debian packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nbdkit libnbd-bin sudo gnutls-bin nginx rsync stunnel4
  PYTHON="${PYTHON:-$(command -v python3.14 python3.13 2>/dev/null | head -1 || true)}"
  if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 13))'; then
    echo "The portal needs Python >= 3.13 (Django 6, and ssl pre-shared keys for NBD over TLS); Debian 12" >&2
    echo "ships 3.11. Build or install one (e.g. pyenv install 3.13) and pass PYTHON=/path/to/python3.13." >&2
    exit 1
  fi
  say "users oma (the portal) and oma-nbd (the NBD server)"
  id oma >/dev/null 2>&1 || useradd --system --home-dir /var/lib/oma --shell /usr/sbin/nologin oma
  id oma-nbd >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin oma-nbd
fi

say "the portal under $PREFIX"
install -d -m 0755 "$PREFIX"
if command -v rsync >/dev/null; then
  rsync -a --delete --exclude .git --exclude .venv --exclude var --exclude '__pycache__' "$SRC/" "$PREFIX/"
else
  (cd "$SRC" && tar --exclude .git --exclude .venv --exclude var --exclude __pycache__ -cf - .) | tar -C "$PREFIX" -xf -
fi

say "folders"
install -d -m 0750 "$ROOT/var/lib/oma" "$ROOT/var/lib/oma/nbd/portal"
install -d -m 0755 "$ROOT/var/lib/oma/nbd" "$ROOT/var/lib/oma/nbd/exports"
install -d -m 0750 "$ROOT/etc/oma"
install -d -m 0700 "$ROOT/etc/oma/tls"
owned oma:oma "$ROOT/var/lib/oma" "$ROOT/var/lib/oma/nbd/portal"
owned root:oma "$ROOT/etc/oma"

say "the privileged helper, its config and its sudoers rule"
# The program sudo runs, and the module it imports from beside it, compiled now (as root, into a root-owned
# folder) so that no call compiles it again.
install -D -m 0755 "$SRC/deploy/oma-nbd-helper" "$ROOT/usr/local/libexec/oma/oma-nbd-helper"
install -m 0644 "$SRC/deploy/oma_nbd_helper.py" "$ROOT/usr/local/libexec/oma/oma_nbd_helper.py"
/usr/bin/python3 -I -m py_compile "$ROOT/usr/local/libexec/oma/oma_nbd_helper.py"
[ -e "$ROOT/etc/oma/nbd-helper.conf" ] || install -m 0644 "$SRC/deploy/etc/nbd-helper.conf" "$ROOT/etc/oma/nbd-helper.conf"
# AES-GCM for NBD over TLS, where the CPU has AES instructions (see the file).
if grep -qw aes /proc/cpuinfo; then
  install -m 0644 "$SRC/deploy/etc/nbd-tls-priority.conf" "$ROOT/etc/oma/nbd-tls-priority.conf"
fi
install -D -m 0440 "$SRC/deploy/sudoers.d/oma-nbd-helper" "$ROOT/etc/sudoers.d/oma-nbd-helper"
if [ "$FILES_ONLY" = 0 ]; then visudo -cf /etc/sudoers.d/oma-nbd-helper; fi

say "the environment file (secrets: mode 0600, kept if it exists)"
if [ ! -e "$ROOT/etc/oma/portal.env" ]; then
  install -m 0600 "$SRC/deploy/etc/portal.env" "$ROOT/etc/oma/portal.env"
  owned oma:oma "$ROOT/etc/oma/portal.env"
fi

say "systemd units, tmpfiles, udev rule, nginx site"
for unit in "$SRC"/deploy/systemd/*.service; do
  install -D -m 0644 "$unit" "$ROOT/etc/systemd/system/$(basename "$unit")"
done
install -D -m 0644 "$SRC/deploy/tmpfiles.d/oma.conf" "$ROOT/etc/tmpfiles.d/oma.conf"
# The OMA side of the stunnel pair (enabled by hand, only for VMAs without NBD TLS: see docs/helper.md).
install -m 0640 "$SRC/deploy/stunnel/oma-nbd.conf" "$ROOT/etc/oma/stunnel-oma-nbd.conf"
owned root:oma-nbd "$ROOT/etc/oma/stunnel-oma-nbd.conf"
install -D -m 0644 "$SRC/deploy/udev/60-oma-nbd.rules" "$ROOT/etc/udev/rules.d/60-oma-nbd.rules"
install -D -m 0644 "$SRC/deploy/nginx/oma.conf" "$ROOT/etc/nginx/sites-available/oma.conf"
install -d -m 0755 "$ROOT/etc/nginx/sites-enabled"
ln -sfn ../sites-available/oma.conf "$ROOT/etc/nginx/sites-enabled/oma.conf"

if [ "$FILES_ONLY" = 1 ]; then
  say "files laid out under $ROOT (nothing else done)"
  exit 0
fi

say "virtual environment"
[ -x "$PREFIX/.venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/python" -m pip install -q --upgrade pip
"$PREFIX/.venv/bin/python" -m pip install -q -r "$PREFIX/requirements.txt"

say "runtime folders, device group, TLS certificate"
systemd-tmpfiles --create /etc/tmpfiles.d/oma.conf
udevadm control --reload && udevadm trigger --subsystem-match=block || true
if [ ! -e /etc/oma/tls/portal.crt ]; then
  # A self-signed certificate until the operator installs the site's own (same paths).
  openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=$(hostname -f)" \
    -keyout /etc/oma/tls/portal.key -out /etc/oma/tls/portal.crt 2>/dev/null
  chmod 0600 /etc/oma/tls/portal.key
fi
rm -f /etc/nginx/sites-enabled/default
nginx -t

say "database, static files, roles, the portal's NBD key"
as_oma() {
  runuser -u oma -- bash -c 'set -a; . /etc/oma/portal.env; set +a; cd "$0" && exec .venv/bin/python manage.py "$@"' \
    "$PREFIX" "$@"
}
as_oma migrate --noinput
as_oma collectstatic --noinput -v0
as_oma setup_roles
as_oma nbd_keys portal
as_oma check --deploy

say "services"
systemctl daemon-reload
systemctl enable --now oma-nbdkit.service oma-worker.service oma-follower.service oma-web.service
systemctl reload-or-restart nginx
cat <<EOT

The OMA portal is installed. Next:
  - edit /etc/oma/portal.env (database, host names, CloudStack, VMA) and restart: systemctl restart oma-web oma-worker oma-follower
  - an admin:        OMA_ADMIN_PASSWORD=... runuser -u oma -- $PREFIX/.venv/bin/python $PREFIX/manage.py setup_roles --user NAME --role admin
  - a key per VMA:   runuser -u oma -- $PREFIX/.venv/bin/python $PREFIX/manage.py nbd_keys add vma-01 --out /root/vma-01.psk
  - replace /etc/oma/tls/portal.{crt,key} with the site's certificate
EOT
