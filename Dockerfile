# pacsys-supervisor as a container image. See ops/README.md, "Containers and Kubernetes".
#
#   docker build -t pacsys-supervisor .
#   docker run --rm -p 50051:50051 -p 9109:9109 \
#       -v "$PWD/ops/supervisor.container.toml:/etc/pacsys/supervisor.toml:ro" \
#       -v /etc/pacsys/token:/run/secrets/pacsys_token:ro \
#       -v /etc/pacsys/tls/server.crt:/run/secrets/pacsys_tls.crt:ro \
#       -v /etc/pacsys/tls/server.key:/run/secrets/pacsys_tls.key:ro pacsys-supervisor
#
# The config file, the token and the TLS certificate and key are mounted, never built in.
# The audit log goes to /var/log/pacsys (a volume). tests/test_container.py lints this file with hadolint and runs
# the command below in a virtual environment built the way the build stage builds it.

FROM python:3.11-slim-bookworm AS build
# One virtual environment in /opt/pacsys, as on a host (ops/README.md, "Install").
RUN python -m venv /opt/pacsys
COPY pyproject.toml README.md /src/
COPY pacsys /src/pacsys
COPY workers /src/workers
RUN /opt/pacsys/bin/pip install --no-cache-dir /src

FROM python:3.11-slim-bookworm
# tini is PID 1: it hands SIGTERM to the front, which drains, and reaps orphans. The front
# itself as PID 1 would also drain, but the kernel ignores signals it has no handler for
# in PID 1, so a second SIGTERM could not end a stuck drain.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root user (the Kubernetes manifests run as this uid), owning the audit directory.
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pacsys \
    && install -d -o pacsys -g pacsys -m 0750 /var/log/pacsys
COPY --from=build /opt/pacsys /opt/pacsys
USER 10001
VOLUME ["/var/log/pacsys"]
# The DAQ service, health and reflection; HTTP /metrics, /healthz and /readyz (metrics_port).
EXPOSE 50051 9109
# Healthy while the service is ready: enough workers, not draining. Asked on the metrics
# port (metrics_port 9109 in ops/supervisor.container.toml), which speaks plain HTTP whether
# the service port serves TLS or not.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/pacsys/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9109/readyz', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/opt/pacsys/bin/pacsys-supervisor", "--config", "/etc/pacsys/supervisor.toml"]
