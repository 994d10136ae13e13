# trio-bridge in a container: one image for both roles.
#   docker build -t trio-bridge .
#   docker run -v ./bridge:/etc/trio-bridge trio-bridge connector -c /etc/trio-bridge/bridge.toml
# The config directory (bridge.toml, keys.toml / tokens.toml, connector.token) is a volume owned
# by uid 10001; key and token files are created there with mode 0600 by `trio-bridge keys|tokens`:
#   docker run --rm -v ./bridge:/etc/trio-bridge trio-bridge keys add alice -c /etc/trio-bridge/bridge.toml
# Examples: conf/docker/compose.connector.yaml (Ollama + connector) and
# conf/docker/compose.broker.yaml (broker behind Caddy).
FROM python:3.12-slim

COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src \
    && useradd --system --uid 10001 --home-dir /etc/trio-bridge --shell /usr/sbin/nologin trio-bridge \
    && mkdir -p /etc/trio-bridge && chown trio-bridge:trio-bridge /etc/trio-bridge && chmod 0750 /etc/trio-bridge

USER trio-bridge
WORKDIR /etc/trio-bridge
VOLUME ["/etc/trio-bridge"]
ENV PYTHONUNBUFFERED=1
# 8080: the broker's public port (and relay endpoint); admin endpoints stay on the container's
# loopback (admin_listen 127.0.0.1:9180 / :9181), where the health check asks them.
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["trio-bridge", "status", "--ready", "-c", "/etc/trio-bridge/bridge.toml"]
ENTRYPOINT ["trio-bridge"]
CMD ["connector", "-c", "/etc/trio-bridge/bridge.toml"]
