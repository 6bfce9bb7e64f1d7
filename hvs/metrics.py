"""The HVS consumer's Prometheus metrics (the process-wide default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("hvs_events_total", "Stream messages handled", ["topic", "outcome"])
BATCHES = Counter("hvs_batches_total", "Batches applied to Redis")
ERRORS = Counter("hvs_errors_total", "Failed batch attempts (retried)", ["kind"])
LAG = Gauge("hvs_lag_messages", "Stream entries not yet applied and committed by the group")
RATE = Gauge("hvs_events_per_second", "Events applied per second over the last interval")
LATENCY = Histogram(
    "hvs_landing_to_applied_seconds",
    "Time from a CDR file landing (loaded_at, else publish time) to its events applied",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 900),
)
LAST_LATENCY = Gauge(
    "hvs_landing_to_applied_last_seconds", "Landing-to-applied time of the latest batch (max)"
)
BATCH_SECONDS = Histogram(
    "hvs_batch_seconds",
    "Time to apply one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PENDING_HOURS = Gauge("hvs_wak_pending_hours", "Usage hours whose WAK cost waits for a rate")
