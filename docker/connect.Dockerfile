# syntax=docker/dockerfile:1
# Kafka Connect (distributed mode) with exactly the two plugins the stack uses:
# the Debezium PostgreSQL source and the Debezium JDBC sink (which bundles the PostgreSQL
# JDBC driver). Debezium's image ships both; the other connectors are removed so the worker
# loads only what it runs. Build context: docker/.
ARG DEBEZIUM_VERSION=2.7.3.Final
FROM quay.io/debezium/connect:${DEBEZIUM_VERSION}

USER root
RUN set -eu; \
    cd "$KAFKA_CONNECT_PLUGINS_DIR"; \
    test -d debezium-connector-postgres; \
    test -d debezium-connector-jdbc; \
    for plugin in *; do \
        case "$plugin" in \
            debezium-connector-postgres|debezium-connector-jdbc) ;; \
            *) rm -rf "$plugin" ;; \
        esac; \
    done; \
    ls "$KAFKA_CONNECT_PLUGINS_DIR"
USER kafka
