# metering-sidecar: AWS Marketplace Metering as plain HTTP on localhost.
#
#   docker build -t metering-sidecar .
#   docker run --rm --read-only -v metering-queue:/var/lib/metering-sidecar \
#     -e METERING_MODE=sandbox -e METERING_PRODUCT_CODE=prod-demo metering-sidecar
#
# Two stages on one base. The builder makes a wheel of the project and installs
# it, with its dependencies, into the virtual environment /opt/venv; the final
# stage gets that venv and nothing else of the build: no compiler, no pip cache,
# no wheel files, no source tree.
#
# BASE_IMAGE is any Debian-like image with Python 3.11+ and its venv module.
# Both stages use it because the venv's bin/python3 is a symlink to the base's
# interpreter: /usr/local/bin/python3 in the official python image,
# /usr/bin/python3 in Debian's own (the stand-in scripts/install-image-tools builds).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# The dependencies first, exactly as locked (requirements/runtime.txt: versions
# and hashes, refreshed by scripts/lock), so that two builds of one commit hold
# the same packages, and a layer cache keeps them until the lock changes.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --require-hashes \
        --requirement requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY app ./app
# Then a wheel of the project, installed from that wheel, so the venv holds
# exactly what `pip install metering-sidecar` would. pip and setuptools leave
# the venv afterwards: nothing at run time installs anything. Bytecode is
# compiled with unchecked hashes so that a read-only root never needs to write
# a .pyc and no file time stamp can make one stale.
RUN /opt/venv/bin/python -m pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/python -m pip install --no-cache-dir /tmp/wheels/*.whl \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv \
    && /opt/venv/bin/metering-sidecar --version


FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z

LABEL org.opencontainers.image.title="metering-sidecar" \
      org.opencontainers.image.description="AWS Marketplace Metering as plain HTTP on localhost: validation, SigV4, retries and a durable usage queue." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# A numeric, non-root user (Kubernetes' runAsNonRoot can only verify a number)
# that owns the queue directory and nothing else.
RUN groupadd --system --gid 10001 metering \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin metering \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/metering-sidecar

COPY --from=builder /opt/venv /opt/venv

# Nothing but the queue is written: no bytecode, no buffered logs to lose on a
# crash, and the queue in a volume so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METERING_QUEUE_PATH=/var/lib/metering-sidecar/queue.sqlite3
VOLUME ["/var/lib/metering-sidecar"]
WORKDIR /var/lib/metering-sidecar
USER 10001:10001

# 8080: the API (on loopback unless METERING_HOST says otherwise); 8081: the
# operations listener (/healthz, /readyz, /metrics) for probes and scraping.
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
# Only what the image has: its Python and urllib. /healthz never calls AWS.
# An opener without proxies: urlopen would send even 127.0.0.1 to HTTP_PROXY,
# which sellers behind an egress proxy set for the sidecar's AWS calls.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-B", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % (os.environ.get('METERING_PORT') or '8080'), timeout=3).close()"]
ENTRYPOINT ["metering-sidecar"]
