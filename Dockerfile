# syntax=docker/dockerfile:1
# memdefragd container image: the daemon and its pinned dependencies, nothing else.
#
#   docker build -t memdefragd:0.1.0 .
#
# It acts on the host's processes, so it runs in the host's PID namespace with four
# capabilities, reading its config from a mounted file: README.md, "Container", has the
# `docker run` line and why each part of it is needed.

# The Python of pyproject's requires-python, on Debian 12 like the hosts `make install`
# targets. Bump the patch release deliberately (and pin a digest in your registry). The
# tests build on a local Debian 12 root instead (tests/deploy/podman.py): any base with
# `python` 3.11+ and its venv module will do.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtualenv with the project and exactly the versions of constraints.txt
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY memdefragd/ memdefragd/
# No systemd extra: there is no journald in a container; memdefragd logs to stderr.
RUN python -m venv /opt/memdefragd \
 && /opt/memdefragd/bin/python -m pip install --no-cache-dir --constraint constraints.txt . \
 && /opt/memdefragd/bin/python -m pip uninstall --yes pip setuptools

# ---- runtime: the virtualenv on the same base, no compiler, no source tree
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="memdefragd" \
      org.opencontainers.image.description="User-space memory-contiguity agent: collapses target processes' memory into huge pages" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="GPL-2.0-only"
ENV PATH=/opt/memdefragd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEMDEFRAGD_METRICS_URL=http://127.0.0.1:9847/metrics
COPY --from=build /opt/memdefragd /opt/memdefragd
# The example, for reference: the config itself is mounted at /etc/memdefragd/memdefragd.yaml
# (root-owned, not writable by others: memdefragd refuses it otherwise). Set
# daemon.metrics.listen to 0.0.0.0:9847 in it unless the container shares the host's
# network, or nothing outside the container can scrape it.
COPY etc/memdefragd.yaml /usr/share/memdefragd/memdefragd.yaml.example
EXPOSE 9847
# Healthy while the metrics endpoint answers; set MEMDEFRAGD_METRICS_URL to match a
# different daemon.metrics.listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MEMDEFRAGD_METRICS_URL'], timeout=4)"]
# Root, on purpose: Docker grants added capabilities to uid 0 only (no ambient set), and
# memdefragd needs them; --cap-drop=ALL and four --cap-add bound what root can do.
ENTRYPOINT ["memdefragd"]
CMD ["run", "--config", "/etc/memdefragd/memdefragd.yaml"]
