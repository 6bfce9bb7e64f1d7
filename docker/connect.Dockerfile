# syntax=docker/dockerfile:1
# Kafka Connect (distributed mode) on the Apache Kafka image, with exactly the two plugins the
# stack uses, fetched by the same pinned manifest (connect/jvm/pom.xml) as the local Kafka path:
# Debezium's PostgreSQL source and Debezium's JDBC sink (with the PostgreSQL JDBC driver), and
# Prometheus' JMX exporter agent with its rules (monitoring/jmx/kafka_connect.yml), which
# docker-compose.yml attaches through KAFKA_OPTS.
# Build context: the repository root (see connect.Dockerfile.dockerignore).
ARG KAFKA_VERSION=4.3.0

FROM maven:3.9-eclipse-temurin-17 AS plugins
WORKDIR /src
COPY connect/jvm/ connect/jvm/
RUN mvn --batch-mode --no-transfer-progress -s connect/jvm/settings.xml -f connect/jvm/pom.xml \
        dependency:copy-dependencies -Dwtc.jvm.cache=/jvm \
    && test -n "$(ls /jvm/plugins/debezium-connector-postgres/debezium-connector-postgres-*.jar)" \
    && test -n "$(ls /jvm/plugins/debezium-connector-jdbc/debezium-connector-jdbc-*.jar)" \
    && test "$(ls /jvm/agents/jmx_prometheus_javaagent-*.jar | wc -l)" = 1

FROM apache/kafka:${KAFKA_VERSION}
COPY --from=plugins /jvm/plugins/ /opt/wtc/plugins/
COPY --from=plugins /jvm/agents/jmx_prometheus_javaagent-*.jar /opt/wtc/jmx_prometheus_javaagent.jar
COPY monitoring/jmx/kafka_connect.yml /opt/wtc/jmx/kafka_connect.yml
COPY docker/kafka/connect-distributed.properties /opt/wtc/connect-distributed.properties
ENTRYPOINT ["/opt/kafka/bin/connect-distributed.sh"]
CMD ["/opt/wtc/connect-distributed.properties"]
