#!/usr/bin/env bash
# Create the stack's topics once the 3-broker cluster is healthy (idempotent: existing topics
# are left as they are). The CRM change topics are created here too, before any sink
# subscribes, so a consumer can never auto-create one with the broker's defaults; Kafka Connect
# creates its own internal topics (and Debezium's heartbeat topic) itself.
set -euo pipefail

BROKERS="${BROKERS:-redpanda-0:9092,redpanda-1:9092,redpanda-2:9092}"
rpk_() { rpk -X "brokers=${BROKERS}" "$@"; }

# name partitions replicas
TOPICS=(
    "tick-data 12 3"
    "cdr-data 6 3"
    "cdr-voice 6 3"
    "crm.crm_system.accounts 3 3"
    "crm.crm_system.addresses 3 3"
    "crm.crm_system.devices 3 3"
)

existing="$(rpk_ topic list | awk 'NR > 1 {print $1}')"
for spec in "${TOPICS[@]}"; do
    read -r name partitions replicas <<<"$spec"
    if grep -qxF "$name" <<<"$existing"; then
        echo "topic $name exists"
    else
        rpk_ topic create "$name" --partitions "$partitions" --replicas "$replicas"
    fi
done
rpk_ topic list
