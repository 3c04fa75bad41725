# The enhanced-locking image: the lock service (`serve`) and the Kubernetes operator
# (`operator`, which the Helm chart runs) in one small, non-root image.
#
#   docker build -t enhanced-locking:dev .
#   docker build --build-arg PYTHON_IMAGE=my-registry.local/python:3.11-slim -t enhanced-locking:dev .
#
# PYTHON_IMAGE is the base of both stages, so the image also builds from a base that was
# imported locally (`docker load -i python-3.11-slim.tar`) where no registry is reachable;
# see docs/06-kubernetes.md. (No `# syntax=` line on purpose: BuildKit would pull that
# frontend image from a registry.) The base must be a Debian-based CPython >= 3.11 image (the
# `requires-python` of pyproject.toml) that has pip and the venv module.
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the wheel of this project, then a virtualenv with it and its dependencies ------
FROM ${PYTHON_IMAGE} AS build
# A package index mirror, where PyPI is not reachable (pip reads it from the environment).
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from, and the pinned versions its dependencies are installed at
# (the ones CI tested; .dockerignore keeps the rest of the tree out).
COPY pyproject.toml README.md constraints.txt ./
COPY operator/ operator/
# Byte-compiled here: the runtime root filesystem is read-only, so nothing is compiled later.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/enhanced-locking \
 && /opt/enhanced-locking/bin/pip install -c constraints.txt /dist/*.whl \
 && /opt/enhanced-locking/bin/python -m compileall -q /opt/enhanced-locking/lib

# --- runtime: the virtualenv on the same base, as a numeric non-root user -------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# The URL of the source repository, passed by the build that knows it (e.g. CI).
ARG SOURCE=""
LABEL org.opencontainers.image.title="enhanced-locking" \
      org.opencontainers.image.description="Atlantis's enhanced locking: a lock service with queues, priorities, timeouts, Redis, and a Kubernetes operator for gradual migration" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.vendor="Enhanced Locking"

COPY --from=build /opt/enhanced-locking /opt/enhanced-locking

# A numeric user (65532, the usual "nonroot") so `runAsNonRoot` can be verified by the kubelet
# without a passwd lookup. /data holds the embedded store (enhanced-locking.db): mount a volume
# there. /tmp is where Python puts temporary files: mount an emptyDir there when the root
# filesystem is read-only (the chart does both).
RUN mkdir -p /data \
 && chown 65532:65532 /data \
 && chmod 0750 /data
VOLUME ["/data"]

ENV PATH=/opt/enhanced-locking/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    ATLANTIS_DATA_DIR=/data \
    ENHANCED_LOCKING_HOST=0.0.0.0 \
    ENHANCED_LOCKING_PORT=4142

USER 65532:65532
WORKDIR /data
EXPOSE 4142

ENTRYPOINT ["enhanced-locking"]
# `serve` runs the lock service alone, so `docker run IMAGE` is useful without a cluster.
# The Helm chart passes `operator ...` instead (service + kopf in one process).
CMD ["serve"]
