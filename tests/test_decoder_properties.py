"""Properties of every decoder (hypothesis): any bytes give a value or a rejection with a
reason (`common.poison.BadInput`), never another exception; the tick sink and the HVS consumer
read the same ticks alike (one decoder); the CDR row rules of Python and Postgres agree."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from common.poison import BadInput, check_json_shape, decode
from hvs import keys as K
from hvs.decode import cdr_category, decode_tick, load_cdr
from ingestion import pgoutput as po
from ingestion import tick_format
from ingestion.cdr_format import kind_of, parse_line
from ingestion.generators.forex import tick_value
from ingestion.stream import Message
from ingestion.tick_format import TickWindow
from ingestion.tick_sink import parse_tick

PAIRS = ("MRVZAR", "WAKMRV")
NOW = datetime(2024, 6, 1)


def msg(topic: str, value: bytes) -> Message:
    return Message(topic=topic, key=None, value=value, position="1-0", headers={})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
prices = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["1e400", "1e-400", "-0", "0", "1.23456789012", "999999.9999999999"]),
)


@st.composite
def tick_like(draw: st.DrawFn) -> bytes:
    """Mostly well-formed ticks with odd parts: times around the window, extreme prices."""
    ts = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 1, 1)))
    fields = {
        "timestamp": f'"{ts:%Y-%m-%d %H:%M:%S.%f}"'.replace(f"{ts.year}-", f"{ts.year:04d}-", 1),
        "pair_name": json.dumps(draw(st.sampled_from([*PAIRS, "EURUSD"]))),
        "bid_price": draw(prices),
        "ask_price": draw(prices),
        "spread": draw(prices),
    }
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


any_tick = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                     tick_like())  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(any_tick)
def test_tick_decoders_give_a_value_or_a_reason_and_agree(value: bytes) -> None:
    window = TickWindow()
    sink = decode(lambda: parse_tick(value, PAIRS, window))
    hvs = decode(lambda: decode_tick(msg("tick-data", value), window))
    for got in (sink, hvs):
        if isinstance(got, BadInput):
            assert str(got) and not str(got).startswith("undecodable")  # a reason, not a crash
    assert isinstance(sink, BadInput) == isinstance(hvs, BadInput)
    if isinstance(sink, BadInput):
        assert str(sink) == str(hvs)
    else:
        assert not isinstance(hvs, BadInput)
        assert hvs.price_sum == K.to_units(sink.bid_price) + K.to_units(sink.ask_price)
        assert hvs.hour == sink.tick_ts.strftime("%Y%m%d%H") and len(hvs.hour) == 10


plain_prices = st.builds(
    lambda whole, frac: f"{whole}.{frac}" if frac else str(whole),
    st.one_of(st.integers(0, 2), st.integers(0, 10**6 + 1), st.sampled_from([999999, 1000000])),
    st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=11)),
)
"""Numbers as JSON writes them: the contract's form (the decoder's fast path) and its edges."""


@st.composite
def contract_ticks(draw: st.DrawFn) -> bytes:
    """Ticks in the producers' own form (`json.dumps`), times around the window's edges."""
    ts = draw(
        st.one_of(
            st.datetimes(min_value=datetime(1999, 12, 31), max_value=datetime(2000, 1, 2)),
            st.datetimes(min_value=NOW, max_value=NOW + timedelta(days=2)),
            st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1)),
        )
    )
    text = draw(st.sampled_from([f"{ts:%Y-%m-%d %H:%M:%S.%f}", f"{ts:%Y-%m-%d %H:%M:%S}"]))
    pair = draw(st.sampled_from([*PAIRS, "EURUSD", "MRV/ZAR"]))
    bid, ask, spread = (draw(plain_prices) for _ in range(3))
    return (
        f'{{"timestamp": "{text}", "pair_name": "{pair}", "bid_price": {bid}, '
        f'"ask_price": {ask}, "spread": {spread}}}'
    ).encode()


@settings(max_examples=600, deadline=None)
@given(st.one_of(contract_ticks(), tick_like()), st.sampled_from([None, NOW]))
def test_tick_fast_path_gives_what_the_checked_decoder_gives(value: bytes, now: datetime | None):
    """The contract's form takes a fast path (no JSON parser); any value decodes to the same
    tick, or is refused with the same reason, as by the full decoder with every check."""
    window = TickWindow()
    fast = decode(lambda: tick_format.decode_tick(value, PAIRS, window, now))
    full = decode(lambda: tick_format.decode_tick_checked(value, PAIRS, window, now))
    assert type(fast) is type(full)
    assert repr(fast) == repr(full)  # the same reason, or the same tick down to each Decimal


def test_producers_ticks_take_the_fast_path() -> None:
    value = tick_value("MRVZAR", datetime(2024, 1, 1, 12, 30, 1, 250_000), 18.1234, 0.0123)
    # an explicit clock: with none, the fast path reuses a reading at most a second old and
    # declines (to the full decoder) when it has none, so the result would depend on timing
    fast = tick_format._decode_contract(value, PAIRS, TickWindow(), NOW)
    assert fast is not None
    assert fast == tick_format.decode_tick_checked(value, PAIRS, TickWindow(), NOW)


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 1, 1)))
def test_tick_window(ts: datetime) -> None:
    window = TickWindow(datetime(2000, 1, 1), timedelta(days=1))
    inside = datetime(2000, 1, 1) <= ts <= NOW + timedelta(days=1)
    assert isinstance(decode(lambda: window.check(ts, NOW)), BadInput) != inside


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400), json_values.map(lambda v: json.dumps(v).encode())),
       st.sampled_from(["cdr-data", "cdr-voice", "other"]))  # fmt: skip
def test_cdr_event_decoder_gives_a_value_or_a_reason(value: bytes, topic: str) -> None:
    got = decode(lambda: load_cdr(value, cdr_category(topic)))
    if isinstance(got, BadInput):
        assert str(got) and not str(got).startswith("undecodable")


@given(st.binary(max_size=200))
def test_cdr_line_parser_gives_fields_or_a_problem(raw: bytes) -> None:
    text, problem, fields = parse_line(raw)
    assert isinstance(text, str) and "\x00" not in text
    assert problem is None or fields == []  # a problem: no fields (0 fields: wrong count)


@given(st.text(max_size=40))
def test_file_names_match_whole(name: str) -> None:
    kind = kind_of(name)
    if kind is not None:
        assert name.isascii() and name.isprintable() and "\n" not in name


@given(st.binary(max_size=200))
def test_pgoutput_decoder_gives_a_message_or_a_reason(data: bytes) -> None:
    try:
        message = po.decode(data)
    except po.DecodeError as exc:  # the reader's rejection, with a reason
        assert str(exc)
    else:
        assert message is not None


@given(st.integers(min_value=0, max_value=50), st.integers(min_value=1, max_value=10))
def test_json_nesting_is_checked_before_parsing(depth: int, limit: int) -> None:
    value = b"[" * depth + b"]" * depth
    got = decode(lambda: check_json_shape(value, 1000, limit))
    assert isinstance(got, BadInput) == (depth > limit)


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_malformed_redis_entries_give_a_value_or_a_reason(field: bytes, value: bytes) -> None:
    for parse in (K.parse_fx_entry, K.parse_pending_entry):
        got = parse(field, value)
        assert isinstance(got, str | tuple)


def test_far_prices_are_refused_alike() -> None:
    for price in ("1e400", "1e-400"):
        value = (
            b'{"timestamp": "2024-01-01 00:00:00", "pair_name": "MRVZAR", "bid_price": '
            + price.encode()
            + b', "ask_price": 2, "spread": 0.1}'
        )
        sink = decode(lambda v=value: parse_tick(v, PAIRS))
        hvs = decode(lambda v=value: decode_tick(msg("tick-data", v)))
        assert isinstance(sink, BadInput) and str(sink) == str(hvs)
        assert "bid_price out of range" in str(sink)
    assert Decimal("1e-400") != 0  # what a float reader would have made 0.0
