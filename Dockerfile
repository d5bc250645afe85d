# ollama-sidecar: a small, non-root, read-only-root friendly image.
#
#   docker build -t ollama-sidecar .
#   docker run --rm -p 11435:11435 --read-only --tmpfs /tmp \
#       -e SIDECAR_UPSTREAM=http://ollama:11434 ollama-sidecar
#
# Needs BuildKit (the default builder since Docker 23; podman/buildah too).
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 (>= 3.11) and its venv module.
#               CI builds its own (debootstrap + docker import, see
#               scripts/docker_smoke.py) because it cannot reach a registry.
#   VERSION, REVISION (git commit), CREATED (RFC 3339)  fill the OCI labels.
# Behind a TLS-intercepting proxy, hand pip the proxy's CA bundle as a build
# secret (it is mounted for the one RUN that downloads and is in no layer):
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
# and a package mirror with --build-arg PIP_INDEX_URL=... .

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# builder: resolves and installs everything into /opt/venv, which is all the
# final stage takes. pip lives in a throwaway venv of its own, so the runtime
# venv never gets pip, setuptools or wheel.
FROM ${BASE_IMAGE} AS builder

ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}

RUN python3 -m venv /opt/pip \
    && python3 -m venv --without-pip /opt/venv

WORKDIR /src

# Bytecode is compiled here, at build time (pip's own step is off), and marked
# never to be checked against the sources' mtimes: the root file system is
# read-only at run time, so a stale .pyc could never be rewritten there, and
# tools that normalise file times cannot make it stale.
#
# Dependencies (and the build backend, as wheels) first, from pyproject.toml
# alone: this layer is rebuilt only when pyproject.toml changes, and a change to
# the code rebuilds only the offline step below.
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' > /tmp/requirements.txt \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' > /tmp/build-requirements.txt \
    && /opt/pip/bin/pip --python /opt/venv/bin/python install --no-compile -r /tmp/requirements.txt \
    && /opt/pip/bin/pip wheel --wheel-dir /tmp/build-backend -r /tmp/build-requirements.txt \
    && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv \
    && rm /tmp/requirements.txt /tmp/build-requirements.txt

# The project itself, as a wheel built offline with the build backend fetched above.
COPY sidecar/ sidecar/
COPY policies/ policies/
RUN /opt/pip/bin/pip wheel --no-deps --no-index --find-links /tmp/build-backend --wheel-dir /tmp/dist . \
    && /opt/pip/bin/pip --python /opt/venv/bin/python install --no-deps --no-index --no-compile /tmp/dist/*.whl \
    && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash \
       /opt/venv/lib/python3*/site-packages/sidecar /opt/venv/lib/python3*/site-packages/policies \
    && rm -rf /tmp/dist /tmp/build-backend

# ---------------------------------------------------------------------------
# runtime: the base image, one user, the venv. No compiler, no pip, no cache.
FROM ${BASE_IMAGE}

# A fixed numeric UID/GID, so `runAsUser: 10001` / `runAsNonRoot: true` in a pod
# and `--user 10001` on docker match the image without a lookup.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

COPY --from=builder /opt/venv /opt/venv

# Listen on every interface of the container's own network namespace. A
# container's loopback is its own: with docker's default bridge network,
# 127.0.0.1 inside the container is unreachable from the host or from other
# containers, even with -p. In a Kubernetes pod the containers share one
# network namespace, so the app reaches the sidecar on 127.0.0.1 either way,
# while the kubelet's httpGet probes and Prometheus arrive on the pod IP and
# need 0.0.0.0 too (k8s/ keeps it and lets a NetworkPolicy guard the port).
# SIDECAR_HOST=127.0.0.1 fits only where nothing but the app must reach it
# (no httpGet probes, no scraping): a NetworkPolicy is the usual guard instead.
# It is an environment variable rather than a `--host` in CMD so that it can
# be overridden the usual ways (env in the pod spec, `docker run -e`); note
# that it beats `listen.host` in a config file: set SIDECAR_HOST= (empty) to
# let the file decide. Command-line flags beat both.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_HOST=0.0.0.0

USER 10001:10001
EXPOSE 11435

# No curl in the image: Python asks /healthz itself (proxies ignored, 2 s budget).
# It follows SIDECAR_PORT; with `--port` on the command line, set SIDECAR_PORT
# instead, or override this check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % (os.environ.get('SIDECAR_PORT') or 11435), timeout=2)"]

# Exec form: ollama-sidecar is PID 1 and gets docker's / kubelet's SIGTERM
# itself (no shell in between to swallow it): /readyz turns 503, open requests
# drain within shutdown.grace (25 s), and it exits 0. Give `docker stop -t`
# (10 s by default) and the pod's terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ollama-sidecar"]
CMD ["serve"]

# Labels last: VERSION, REVISION and CREATED change with every build, and an
# ARG change invalidates the build cache of every step after it.
ARG BASE_IMAGE
ARG VERSION=dev
ARG REVISION=
ARG CREATED=
LABEL org.opencontainers.image.title="ollama-sidecar" \
      org.opencontainers.image.description="A streaming-transparent sidecar reverse proxy for Ollama with pluggable policies" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
