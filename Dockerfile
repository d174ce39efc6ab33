# The kit's sample service as an image (docs/containers.md). Build from the repo's root:
#   docker build -t hotswap:0.1.0 .        (or: podman build -t hotswap:0.1.0 .)
# Checked here with hadolint (tests/test_manifests.py); see the doc for what was run here.

# BASE: any Debian-like image with Python 3.11 at `python` (and its headers, for the builder);
# a local one where no registry is reachable (docs/containers.md).
ARG BASE=python:3.11-slim-bookworm

# -- builder: uWSGI has no wheel on PyPI, so it is compiled once, here, into a venv ------------
FROM ${BASE} AS builder
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hotswap ./hotswap
RUN python -m venv /opt/hotswap/venv \
 && /opt/hotswap/venv/bin/pip install --no-cache-dir .
# A sample data set, so the image serves on its own; a real deployment mounts its own data/.
ARG TERMS=200000
COPY scripts/gen_resource.py scripts/build_store.py /src/scripts/
RUN /opt/hotswap/venv/bin/python scripts/gen_resource.py --terms "${TERMS}" --version v1 \
        -o /seed/terms.tsv \
 && /opt/hotswap/venv/bin/python scripts/build_store.py /seed/terms.tsv -o /seed/store \
        --point --if-missing

# -- runtime: no compiler, a non-root user, the store on a volume -----------------------------
# hadolint ignore=DL3006
FROM ${BASE}
RUN groupadd --system --gid 10001 hotswap \
 && useradd --system --uid 10001 --gid hotswap --home-dir /srv/hotswap --shell /usr/sbin/nologin hotswap
COPY --from=builder /opt/hotswap/venv /opt/hotswap/venv
WORKDIR /srv/hotswap
COPY srv.py srv.ini ./
COPY --from=builder --chown=hotswap:hotswap /seed ./data
RUN mkdir run log && chown hotswap:hotswap run log
# HOTSWAP_INI: `docker exec`/`kubectl exec` run the CLI from / (no --ini needed);
# HOTSWAP_GRACE: a stop's budget, inside Kubernetes' default 30 s grace period.
ENV PATH=/opt/hotswap/venv/bin:$PATH \
    HOTSWAP_INI=/srv/hotswap/srv.ini \
    HOTSWAP_GRACE=25 \
    PYTHONUNBUFFERED=1
USER 10001
VOLUME ["/srv/hotswap/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s CMD ["hotswap", "probe"]
# PID 1 is hotswap's supervisor (never a bare uWSGI master: it would die at the first swap,
# and the kernel would kill the container with it); it reaps, and turns SIGTERM into a
# graceful stop.
ENTRYPOINT ["hotswap", "start"]
