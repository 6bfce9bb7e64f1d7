"""The input rows of the rules: CDR data and voice records as landed in cdr_data.*."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class DataRecord:
    msisdn: str
    tower_id: int
    up_bytes: int
    down_bytes: int
    data_type: str
    event_datetime: datetime
    source_file: str = ""
    line_no: int = 0

    category = "data"

    @property
    def event_ts(self) -> datetime:
        return self.event_datetime

    @property
    def event_end(self) -> datetime:
        return self.event_datetime

    @property
    def usage_type(self) -> str:
        return self.data_type

    @property
    def total_bytes(self) -> int:
        return self.up_bytes + self.down_bytes


@dataclass(frozen=True, slots=True)
class VoiceRecord:
    msisdn: str
    tower_id: int
    call_type: str
    call_duration_sec: int
    start_time: datetime
    source_file: str = ""
    line_no: int = 0

    category = "call"

    @property
    def event_ts(self) -> datetime:
        return self.start_time

    @property
    def event_end(self) -> datetime:
        """A call ends at start_time + call_duration_sec seconds."""
        return self.start_time + timedelta(seconds=self.call_duration_sec)

    @property
    def usage_type(self) -> str:
        return self.call_type


Record = DataRecord | VoiceRecord
