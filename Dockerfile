# syntax=docker/dockerfile:1
# The Safous sidecar as a container image (docs/platform/deployment.md):
#
#   docker build -t safous-sidecar:"$(make -s version)" .
#
# Stage `build` makes the sdist and, from it, the wheel: `python -m build`, the command
# `make dist` runs and tests/test_packaging.py runs before it installs that wheel into a new
# virtualenv and serves a real Envoy with it. The build generates sidecar._pb (setup.py, with the
# grpcio-tools pyproject.toml pins). The final stage installs that wheel, and nothing else of the
# source, into a slim Python.
#
# At run time the image writes only under /var/lib/safous, a volume: rules.db (with its -wal and
# -shm files) and, with --workers, the directory of the workers' sockets (no temporary directory
# is writable; removed when the pod stops). It runs with a read-only root filesystem, as a
# non-root user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# The same pin as the dev extras in pyproject.toml.
RUN pip install --no-cache-dir build==1.6.1
# What the sdist is made of (MANIFEST.in); .dockerignore lets in exactly these.
COPY pyproject.toml setup.py MANIFEST.in README.md CHANGELOG.md ./
COPY proto/ proto/
COPY sidecar/ sidecar/
COPY envoy/ envoy/
RUN python -m build --outdir /dist .

FROM ${PYTHON_IMAGE}
# Nothing to write at import time (the wheel's modules are compiled when installed), log lines
# reach `docker logs` / `kubectl logs` as they are written. Health and metrics listen on every
# interface for the kubelet's probes and Prometheus, which needs --insecure-listen http (that
# listener has no TLS); gRPC stays on loopback, and would refuse a network address without TLS.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SAFOUS_DB=/var/lib/safous/rules.db \
    SAFOUS_HTTP=0.0.0.0:9192 \
    SAFOUS_INSECURE_LISTEN=http
RUN groupadd --system --gid 10001 safous \
    && useradd --system --uid 10001 --gid safous --no-create-home --home-dir /var/lib/safous \
       --shell /usr/sbin/nologin safous \
    && mkdir /var/lib/safous \
    && chown safous:safous /var/lib/safous
# The wheel is mounted, not copied: no layer keeps it.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir /dist/*.whl
# Where `docker exec` starts; nothing depends on it (the sidecar writes beside SAFOUS_DB).
WORKDIR /var/lib/safous
VOLUME ["/var/lib/safous"]
# A numeric user, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 9191: the ext_authz gRPC port; the sidecar listens on 127.0.0.1 unless SAFOUS_LISTEN says
# otherwise (Envoy in the same pod, or `docker run --network container:ENVOY`, reaches it there).
# 9192: /healthz, /readyz and /metrics (SAFOUS_HTTP).
EXPOSE 9191 9192
# Docker's own probe. Kubernetes ignores it: there, probe /healthz (liveness) and /readyz
# (readiness: rules.db loaded, last reload worked, not draining) on port 9192, as
# envoy/kubernetes-sidecar.yaml does.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://' + os.environ['SAFOUS_HTTP'] + '/healthz', timeout=2)"]
# Every flag of `safous-sidecar serve` is also a SAFOUS_* variable (docs/platform/settings-and-lifecycle.md).
ENTRYPOINT ["safous-sidecar", "serve"]
