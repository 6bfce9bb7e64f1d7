"""Settings of the HVS consumer: `REDIS_URL` and `STREAM_URL` from the shared connections, the
rest `HVS_*`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings, TickRules


class HvsSettings(ServiceSettings, TickRules):
    """The high velocity store (Redis db 0) and its consumer: `REDIS_URL`, `STREAM_URL`, the tick
    window `WTC_TICK_*` (shared with the tick sink), the rest `HVS_*`."""

    model_config = SettingsConfigDict(env_prefix="HVS_", extra="ignore", populate_by_name=True)

    REDIS_ROLE = "hvs"
    SECRET_FIELDS = ("redis_url", "stream_url")

    retention_days: int = Field(
        default=35, ge=1, description="keys expire this long after their last write"
    )
    group: str = "hvs"
    consumer_name: str | None = Field(
        default=None, description="stable name: a restart re-reads its own uncommitted entries"
    )
    gone_after_ms: int = Field(
        default=600_000,
        ge=1000,
        description="Redis Streams: a consumer of the group not heard from this long is gone: "
        "its pending entries are claimed, then it is removed from the group",
    )
    drain_gone_after_ms: int = Field(
        default=5_000,
        ge=0,
        description="the same with --drain: a consumer idle this long is taken for gone at once "
        "(a live one polls every poll_timeout); a wrong guess costs only work, the HVS applies an "
        "event once",
    )
    data_topic: str = "cdr-data"
    voice_topic: str = "cdr-voice"
    tick_topic: str = "tick-data"
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    poll_timeout: float = Field(default=0.5, gt=0)
    refresh_seconds: float = Field(
        default=0.5, ge=0, description="reload rates shared by the group's consumers this often"
    )
    metrics_port: int = Field(default=19104, description="0 disables the metrics server")
    group_metrics_port: int = Field(
        default=19140,
        ge=1,
        description="`--processes N`: process 0 serves on `metrics_port`, process i >= 1 on "
        "this + i - 1 (a range of its own, clear of the other services' ports)",
    )

    def process_metrics_ports(self, processes: int) -> list[int]:
        """The metrics port of each of `processes` consumers run by `--processes` (all 0 when
        the metrics server is off)."""
        if not self.metrics_port:
            return [0] * processes
        extra = [self.group_metrics_port + i for i in range(processes - 1)]
        if self.metrics_port in extra:
            raise ValueError(
                f"HVS_GROUP_METRICS_PORT range {extra[0]}-{extra[-1]} holds HVS_METRICS_PORT "
                f"{self.metrics_port}: move one of them"
            )
        return [self.metrics_port, *extra]

    @property
    def retention_seconds(self) -> int:
        return self.retention_days * 86_400
