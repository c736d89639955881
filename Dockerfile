# Corral's container image: a small Python base, Corral installed in its own venv in
# a build stage, run as an unprivileged user. The configuration is mounted read-only
# at /etc/corral/corral.yaml (see deploy/compose.yaml); what Corral writes (the usage
# ledger, when state is memory) goes to the volume /var/lib/corral, which that user
# owns:
#   docker build -t corral .
#   docker run -p 8080:8080 -v $PWD/corral.yaml:/etc/corral/corral.yaml:ro \
#     -v corral-state:/var/lib/corral corral
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY corral ./corral
RUN python -m venv /opt/corral \
 && /opt/corral/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && find /opt/corral -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin corral \
 && install -d -o corral -g corral -m 0750 /var/lib/corral
COPY --from=build /opt/corral /opt/corral
# STATE_DIRECTORY, as systemd's StateDirectory= sets it: the ledger's default file is
# there, not beside the read-only configuration.
ENV PATH=/opt/corral/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STATE_DIRECTORY=/var/lib/corral
VOLUME /var/lib/corral
USER corral
EXPOSE 8080
# /healthz answers as soon as the process serves; it needs no key. The port is the
# one of the mounted configuration's `listen` (8080 in deploy/corral.yaml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# SIGTERM lets in-flight streams finish for shutdown_grace; SIGHUP reloads.
STOPSIGNAL SIGTERM
ENTRYPOINT ["corral", "serve", "--config", "/etc/corral/corral.yaml"]
