#!/usr/bin/env bash
# Create the stack's topics once the 3-node cluster is healthy (idempotent: existing topics are
# left as they are), with replication factor 3, min.insync.replicas=2 and 35 days' retention
# (as long as the HVS keeps usage; ops/stack/kafka.py PROJECT_TOPIC_CONFIG). The CRM change topics
# are created here too, before any sink subscribes, so none is ever created with other
# settings; Kafka Connect creates its own internal topics (and Debezium's heartbeat topic).
# The local Kafka path (ops/stack/kafka.py) reads the TOPICS array below: one list for both.
set -euo pipefail

BROKERS="${BROKERS:-kafka-0:9092,kafka-1:9092,kafka-2:9092}"
TOPICS_CMD="${TOPICS_CMD:-/opt/kafka/bin/kafka-topics.sh}"
topics_() { "$TOPICS_CMD" --bootstrap-server "$BROKERS" "$@"; }

# name partitions replicas
TOPICS=(
    "tick-data 12 3"
    "cdr-data 6 3"
    "cdr-voice 6 3"
    "crm.crm_system.accounts 3 3"
    "crm.crm_system.addresses 3 3"
    "crm.crm_system.devices 3 3"
)

for spec in "${TOPICS[@]}"; do
    read -r name partitions replicas <<<"$spec"
    topics_ --create --if-not-exists --topic "$name" --partitions "$partitions" \
        --replication-factor "$replicas" --config min.insync.replicas=2 \
        --config retention.ms=3024000000
done
topics_ --list
