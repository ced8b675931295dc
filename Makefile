# OMA portal. Quick start on a fresh Debian 12 machine: `make demo` or `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nbdkit nbd-server libnbd-bin sudo chromium gnutls-bin nginx stunnel4
# gnutls-bin: psktool, to inspect NBD TLS key files. nginx: `nginx -t` checks the shipped site.
# stunnel4: the stunnel pair for VMAs without NBD TLS is tested end to end.
# chromium: the browser tests drive Debian's /usr/bin/chromium through Playwright (no browser download).

.PHONY: demo demo-migrate demo-jobs test setup system-packages venv check lint clean bench

# Python >= 3.13 (Django 6 needs 3.12; NBD over TLS with pre-shared keys needs 3.13's ssl PSK support):
# PYTHON=... if given, else the newest pyenv 3.13+, else python3.1x on PATH.
PYTHON ?= $(shell for p in $$(ls -d $$HOME/.pyenv/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV) \
	$$(command -v python3.14 python3.13 python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && { echo $$p; break; }; done)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: requirements.txt
	@if [ -z "$(PYTHON)" ]; then \
	  echo "No Python >= 3.13 found. The portal needs it (Django 6, and ssl pre-shared keys for NBD over TLS): install one (e.g. 'pyenv install 3.13') or run make PYTHON=/path/to/python3.13"; exit 1; fi
	@echo "Using $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

setup: system-packages venv
	$(PY) manage.py migrate --noinput -v0

demo: setup
	$(PY) manage.py demo_env > var/demo.env
	$(VENV)/bin/honcho -f Procfile -e var/demo.env start

# Run while `make demo` is up: pull the simulator's inventory, start a migration, show the jobs.
VM ?= web-01
demo-migrate: venv
	@test -f var/demo.env || { echo "start 'make demo' first"; exit 1; }
	set -a; . var/demo.env; set +a; $(PY) manage.py discover_vms && $(PY) manage.py start_migration $(VM)

demo-jobs: venv
	@set -a; . var/demo.env; set +a; $(PY) manage.py jobs

# axe-core (the npm package) is injected into every page by the browser tests' accessibility check.
AXE_VERSION := 4.14.1
AXE := $(VENV)/axe/node_modules/axe-core/axe.min.js
$(AXE):
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get install -y -qq npm; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/axe axe-core@$(AXE_VERSION)

test: system-packages venv $(AXE)
	$(VENV)/bin/pytest -n 2 --durations=25 $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .
	$(PY) manage.py makemigrations --check --dry-run

bench: setup
	$(PY) -m bench.export_storm --backend nbdkit --vms 50 --disks 2 --workers 8
	$(PY) -m bench.export_storm --backend nbd-server --vms 50 --disks 2 --workers 8
	$(PY) -m bench.migration_e2e --vms 3 --disks 2 --size-mib 256
	$(PY) -m bench.live_latency --clients 50 --events 200
	$(PY) -m bench.page_scale --jobs 10000 --mappings 20000

clean:
	rm -rf var/ .pytest_cache .mypy_cache .ruff_cache
