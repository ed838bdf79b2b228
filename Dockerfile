# The relay daemon for the cluster's head node: `docker compose up -d` (see docker-compose.yml).
# Only the relay side is installed (pip install .[server]); trainers install the package on their
# own nodes with plain `pip install .`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid, so that mounted keys can be made readable to it on the host: chown -R 10001 relay-keys
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --home-dir /home/relay --create-home --shell /usr/sbin/nologin relay \
    && install -d -o relay -g relay -m 0750 /var/lib/relay

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install ".[server]" && rm -rf /src

USER relay
WORKDIR /home/relay
# The spool (SQLite) and offline W&B runs live on a volume: they must outlive the container.
ENV HOME=/home/relay RELAY_SPOOL_DIR=/var/lib/relay
VOLUME ["/var/lib/relay"]
EXPOSE 5555
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve", "--bind", "tcp://0.0.0.0:5555", "--curve", "/keys"]
