#!/bin/sh
# Starts RabbitMQ and gives each recap role its password from the
# environment: definitions.json ships the role users without one, so none
# can log in until this has run. Refuses to start the broker without them.
set -eu
for role in MIGRATE GATEWAY ROUTER WORKER PRODUCER; do
  eval "pw=\${RECAP_AMQP_${role}_PASSWORD:-}"
  if [ -z "$pw" ]; then
    echo "RECAP_AMQP_${role}_PASSWORD is not set" >&2
    exit 1
  fi
done
rabbitmq-server &
server=$!
rabbitmqctl -q await_startup
for role in migrate gateway router worker producer; do
  upper=$(echo "$role" | tr '[:lower:]' '[:upper:]')
  eval "pw=\${RECAP_AMQP_${upper}_PASSWORD}"
  # On stdin, so that the password is not on a command line.
  printf '%s' "$pw" | rabbitmqctl -q change_password "recap-$role"
done
touch /tmp/recap-passwords-set
wait "$server"
