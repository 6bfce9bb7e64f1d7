"""Monitoring: the Prometheus configuration and alert rules (rendered from `MonitoringSettings`),
Alertmanager's routing, the project's alert receiver, the CDR drop-folder probe, the dbt run
metrics and the Grafana dashboards."""
