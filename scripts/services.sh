#!/usr/bin/env bash
# Starts RabbitMQ and PostgreSQL on 127.0.0.1 where they are not running,
# installing them from Debian's packages where they are missing. Leaves
# running services alone. Idempotent.
set -euo pipefail

log() { echo "[services] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL ---------------------------------------------------------
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ! command -v pg_isready >/dev/null || ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing postgresql"
    apt_install postgresql postgresql-client
    fresh_pg=1
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  if [ "${fresh_pg:-0}" = 1 ]; then
    # Tests and the demo connect as postgres over TCP without a password.
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    as_root sed -i -E 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/; s/^(host\s+all\s+all\s+::1\/128\s+)\S+/\1trust/; s/^(local\s+all\s+postgres\s+)\S+/\1trust/' "$hba"
  fi
  log "starting postgresql $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 60); do pg_up && break; sleep 1; done
  pg_up || { log "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
fi

# --- RabbitMQ -----------------------------------------------------------
rmq_up() { rabbitmq-diagnostics -q ping >/dev/null 2>&1; }
if ! command -v rabbitmq-diagnostics >/dev/null || ! rmq_up; then
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing rabbitmq-server"
    apt_install rabbitmq-server
  fi
  if ! rmq_up; then
    log "starting rabbitmq"
    as_root rabbitmq-server -detached || true
    for _ in $(seq 1 90); do rmq_up && break; sleep 1; done
    rmq_up || { log "RabbitMQ did not come up"; exit 1; }
  fi
fi
# The demo and the operators' dashboards read queue depth from this plugin.
as_root rabbitmq-plugins enable --quiet rabbitmq_prometheus >/dev/null 2>&1 || true
log "PostgreSQL and RabbitMQ are up"
