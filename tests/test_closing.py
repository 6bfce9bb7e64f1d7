"""common/closing.py: leaving a `with` block closes the object; a close that fails while the
block's own error propagates is logged and the block's error is the one raised. The stream
clients, the SFTP client, the CDR loader and the CRM reader all use it."""

from __future__ import annotations

import logging

import pytest

from common.closing import Closing
from ingestion.cdr_loader import CdrLoader
from ingestion.cdr_sftp import CdrSftp
from ingestion.crm_cdc import CrmCdc
from ingestion.stream import Consumer, Producer
from ingestion.stream.kafka import KafkaConsumer, KafkaProducer
from ingestion.stream.redis_streams import RedisConsumer, RedisProducer


class Resource(Closing):
    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        if self.fails:
            raise OSError("connection already gone")


def test_the_block_closes_and_returns_the_object():
    with Resource() as r:
        assert r.closed == 0
    assert r.closed == 1


def test_a_failing_close_is_raised_when_the_block_succeeded():
    with pytest.raises(OSError, match="already gone"), Resource(fails=True):
        pass


def test_the_blocks_error_wins_over_a_failing_close(caplog):
    r = Resource(fails=True)
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="the real cause"), r:
        raise ValueError("the real cause")
    assert r.closed == 1
    assert "closing Resource failed while handling another error" in caplog.text


@pytest.mark.parametrize(
    "cls",
    [CdrLoader, CdrSftp, CrmCdc, KafkaConsumer, KafkaProducer, RedisConsumer, RedisProducer],
)
def test_the_closing_classes_share_the_one_mixin(cls):
    assert Closing in cls.__mro__
    assert cls.__exit__ is Closing.__exit__ and cls.__enter__ is Closing.__enter__


def test_the_stream_protocols_include_closing():
    for protocol in (Producer, Consumer):
        assert {"close", "__enter__", "__exit__"} <= set(dir(protocol))
        assert Closing in protocol.__mro__
