"""spiced/http/encode.py, encode_json.py, values.py: Arrow batches → JSON / CSV / text table / Arrow IPC,
checked by parsing the output back (json, pyarrow.csv, pyarrow.ipc) and against DataFusion's own
JSON writer (arrow-json, what upstream uses)."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from datafusion import SessionContext
from hypothesis import given, settings
from hypothesis import strategies as st
from pyarrow import ipc

from spiced.batches import coalesce
from spiced.http.encode import (
    ArrowStreamEncoder,
    CsvEncoder,
    TableEncoder,
    encode_all,
    encoder_for,
    negotiate,
    render_table,
)
from spiced.http.encode_json import JsonEncoder, small_rows_encoder
from spiced.http.values import SMALL_ROWS, float_text, json_escape, value_bytes


def to_json(*batches: pa.RecordBatch, schema: pa.Schema | None = None) -> bytes:
    return encode_all(JsonEncoder(schema or batches[0].schema), batches)


def kernel_rows(batch: pa.RecordBatch) -> str:
    """The row texts of the DataFusion-kernel path, whatever the batch size."""
    return "".join(value_bytes(r).to_pybytes().decode() for r in JsonEncoder(batch.schema).rows(batch))


def batch_of(**columns: pa.Array) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))


def big(batch: pa.RecordBatch, times: int = SMALL_ROWS + 1) -> pa.RecordBatch:
    """The same rows repeated past the small-batch threshold, so the kernel path is taken."""
    return pa.Table.from_batches([batch] * times).combine_chunks().to_batches()[0]


# ------------------------------------------------------------------ negotiation


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "application/json"),
    ("", "application/json"),
    ("*/*", "application/json"),
    ("text/csv", "text/csv"),
    ("TEXT/CSV", "text/csv"),
    ("text/plain", "text/plain"),
    ("application/vnd.apache.arrow.stream", "application/vnd.apache.arrow.stream"),
    ("text/csv;q=0.4, text/plain;q=0.8", "text/plain"),
    ("text/plain;q=0.8, text/csv;q=0.8", "text/plain"),  # equal q: first listed wins
    ("text/plain; charset=utf-8", "application/json"),  # parameters break the match
    ("text/html, text/csv;q=0.1", "text/csv"),
    ("text/csv;q=0", "application/json"),
    ("text/csv;q=abc", "application/json"),
    ("application/xml", "application/json"),
])
def test_negotiate(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected


# ------------------------------------------------------------------ JSON


def test_select_one_matches_upstream() -> None:
    batch = SessionContext().sql("SELECT 1").collect()[0]
    assert to_json(batch) == b'[{"Int64(1)":1}]'


def test_no_batches_and_empty_batches_give_an_empty_array() -> None:
    schema = pa.schema([("a", pa.int64())])
    assert encode_all(JsonEncoder(schema), []) == b"[]"
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    assert encode_all(JsonEncoder(schema), [empty, empty]) == b"[]"


def test_rows_across_batches_including_empty_ones() -> None:
    schema = pa.schema([("a", pa.int64())])
    parts = [pa.RecordBatch.from_pylist([], schema=schema), pa.RecordBatch.from_pylist([{"a": 1}], schema=schema),
             pa.RecordBatch.from_pylist([], schema=schema), big(pa.RecordBatch.from_pylist([{"a": 2}], schema=schema))]
    assert json.loads(encode_all(JsonEncoder(schema), parts)) == [{"a": 1}] + [{"a": 2}] * (SMALL_ROWS + 1)


@pytest.mark.parametrize("size", [1, SMALL_ROWS + 1], ids=["small", "kernel"])
def test_string_escaping(size: int) -> None:
    values = ['say "hi"', "back\\slash", "line\nbreak\r\ttab", "bell\x07 nul\x00 esc\x1b", "\x08\x0c",
              "unicode é 😀 \u2028", "", "plain", None]
    batch = big(batch_of(s=pa.array(values)), size)
    parsed = json.loads(to_json(batch))
    assert [row.get("s") for row in parsed[: len(values)]] == values
    text = to_json(batch).decode()
    assert "é 😀" in text  # not \\u-escaped: UTF-8 as is
    assert "\x00" not in text and "\x07" not in text


def test_json_escape_kernel_only_touches_what_needs_it() -> None:
    plain = pa.array(["a", "b", None])
    assert json_escape(plain) is plain  # nothing to escape: the array itself
    assert json_escape(pa.array(['"', "\\", "\x01"])).to_pylist() == ['\\"', "\\\\", "\\u0001"]
    assert json_escape(pa.array(["x\ny"], pa.string_view())).to_pylist() == ["x\\ny"]


@pytest.mark.parametrize("size", [1, SMALL_ROWS + 1], ids=["small", "kernel"])
def test_nulls_are_omitted_nan_and_infinity_too(size: int) -> None:
    batch = big(batch_of(a=pa.array([None, 1, None]), b=pa.array([1.5, float("nan"), float("-inf")]),
                         c=pa.array(["x", None, None]), n=pa.nulls(3)), size)
    assert json.loads(to_json(batch))[:3] == [{"b": 1.5, "c": "x"}, {"a": 1}, {}]


def test_leading_nullable_column_and_all_null_rows() -> None:
    batch = big(batch_of(a=pa.array([None, 1, None], pa.int64()), b=pa.array([None, None, 2.0])))
    text = to_json(batch).decode()
    assert text.startswith('[{},{"a":1},{"b":2.0},{}')


def test_temporal_values_as_arrow_json_writes_them() -> None:
    ts = dt.datetime(2024, 1, 2, 3, 4, 5)
    batch = batch_of(
        ts_s=pa.array([ts], pa.timestamp("s")),
        ts_ms=pa.array([ts.replace(microsecond=500000)], pa.timestamp("ms")),
        ts_us=pa.array([ts.replace(microsecond=123456)], pa.timestamp("us")),
        ts_ns=pa.array([ts], pa.timestamp("ns")),
        ts_utc=pa.array([ts], pa.timestamp("s", tz="UTC")),
        ts_off=pa.array([ts], pa.timestamp("ms", tz="+02:00")),
        d32=pa.array([ts.date()], pa.date32()),
        t64=pa.array([dt.time(10, 11, 12)], pa.time64("us")),
    )
    assert json.loads(to_json(batch)) == [{
        "ts_s": "2024-01-02T03:04:05", "ts_ms": "2024-01-02T03:04:05.500", "ts_us": "2024-01-02T03:04:05.123456",
        "ts_ns": "2024-01-02T03:04:05", "ts_utc": "2024-01-02T03:04:05Z", "ts_off": "2024-01-02T05:04:05+02:00",
        "d32": "2024-01-02", "t64": "10:11:12",
    }]


@pytest.mark.parametrize("size", [1, SMALL_ROWS + 1], ids=["small", "kernel"])
def test_numbers_decimals_booleans(size: int) -> None:
    batch = big(batch_of(
        i=pa.array([-(2**63)], pa.int64()), u=pa.array([2**64 - 1], pa.uint64()), f=pa.array([1.0]),
        small=pa.array([2.5e-5]), large=pa.array([1e20]), f32=pa.array([0.1], pa.float32()),
        dec=pa.array([decimal.Decimal("-12.50")], pa.decimal128(10, 2)), b=pa.array([True]), b2=pa.array([False]),
    ), size)
    text = to_json(batch).decode()
    row = json.loads(text, parse_float=decimal.Decimal)[0]
    assert row == {"i": -(2**63), "u": 2**64 - 1, "f": 1, "small": decimal.Decimal("0.000025"),
                   "large": decimal.Decimal("1e20"), "f32": decimal.Decimal("0.1"), "dec": decimal.Decimal("-12.50"),
                   "b": True, "b2": False}
    assert '"f":1.0,' in text and '"dec":-12.50,' in text  # a double keeps its ".0"; a decimal its scale


def test_nested_binary_and_durations() -> None:
    batch = batch_of(
        l=pa.array([[1, None, 3]]),
        st=pa.array([{"a": 1, "b": None, "c": "x"}]),
        m=pa.array([[("k", 1.5)]], pa.map_(pa.string(), pa.float64())),
        bin=pa.array([b"\x00\xff"]),
        dur=pa.array([dt.timedelta(seconds=90, milliseconds=250)], pa.duration("ms")),
        nested=pa.array([[{"t": dt.datetime(2024, 1, 1, tzinfo=dt.UTC), "d": decimal.Decimal("1.5")}]]),
    )
    assert json.loads(to_json(batch)) == [{
        "l": [1, None, 3], "st": {"a": 1, "c": "x"}, "m": {"k": 1.5}, "bin": "00ff", "dur": "PT90.25S",
        "nested": [{"t": "2024-01-01T00:00:00Z", "d": 1.5}],
    }]


def test_dictionary_and_string_view_columns() -> None:
    batch = big(batch_of(d=pa.array(["a", None, "a"]).dictionary_encode(),
                         v=pa.array(["x", "y", None], pa.string_view())))
    assert json.loads(to_json(batch))[:3] == [{"d": "a", "v": "x"}, {"v": "y"}, {"d": "a"}]


def test_column_names_are_escaped_keys() -> None:
    batch = batch_of(**{'we"ird\\name': pa.array([1]), "a.b": pa.array([2]), "Int64(1)": pa.array([3])})
    assert json.loads(to_json(big(batch)))[0] == {'we"ird\\name': 1, "a.b": 2, "Int64(1)": 3}


def test_duplicate_column_names_are_kept() -> None:
    batch = SessionContext().sql("SELECT a.x, b.x FROM (SELECT 1 AS x) a, (SELECT 2 AS x) b").collect()[0]
    assert to_json(batch) == b'[{"x":1,"x":2}]'
    assert to_json(big(batch)).startswith(b'[{"x":1,"x":2},')


def test_large_batch_is_sliced_and_views_arrow_buffers() -> None:
    n = 150_000
    batch = batch_of(a=pa.array(range(n)), s=pa.array([f"v{i}" for i in range(n)]))
    encoder = JsonEncoder(batch.schema)
    chunks = encoder.batch(batch)
    assert len(chunks) >= 3 and all(isinstance(c, memoryview) for c in chunks)
    parsed = json.loads(b"[" + b"".join(chunks) + b"]")
    assert [r["a"] for r in parsed] == list(range(n)) and parsed[-1] == {"a": n - 1, "s": f"v{n - 1}"}


def test_same_values_as_datafusion_json_writer(tmp_path: Path) -> None:
    ctx = SessionContext()
    df = ctx.sql("""
        SELECT value AS id, value * 0.25 AS f, CASE WHEN value % 3 = 0 THEN NULL ELSE concat('n"', value) END AS s,
               to_timestamp_seconds(1700000000 + value) AS ts, CAST(value AS DECIMAL(12, 3)) / 7 AS dec,
               value % 2 = 0 AS even, make_array(value, value + 1) AS arr, named_struct('k', value) AS obj
        FROM generate_series(1, 2000)""")
    out = tmp_path / "out.json"
    df.write_json(str(out))
    files = [out] if out.is_file() else sorted(out.iterdir())
    expected = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    ours = json.loads(encode_all(JsonEncoder(df.schema()), df.collect()))
    assert sorted(ours, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])


@st.composite
def mixed_batches(draw: st.DrawFn) -> pa.RecordBatch:
    n = draw(st.integers(1, 20))
    floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([1e-5, 2.5e-5, 1e16, 1e-7, 0.0]))
    texts = st.one_of(st.none(), st.text(st.characters(codec="utf-8"), max_size=8))
    return batch_of(
        i=pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=n, max_size=n)),
                   pa.int64()),
        f=pa.array(draw(st.lists(floats, min_size=n, max_size=n)), pa.float64()),
        s=pa.array(draw(st.lists(texts, min_size=n, max_size=n)), pa.string()),
        d=pa.array(draw(st.lists(st.one_of(st.none(), st.decimals(-(10**6), 10**6, places=3, allow_nan=False)),
                                 min_size=n, max_size=n)), pa.decimal128(12, 3)),
        b=pa.array(draw(st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n)), pa.bool_()),
        l=pa.array(draw(st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(-5, 5)), max_size=3)),
                                 min_size=n, max_size=n)), pa.list_(pa.int64())),
    )


@settings(max_examples=60, deadline=None)
@given(mixed_batches())
def test_small_path_prints_exactly_what_the_kernels_print(batch: pa.RecordBatch) -> None:
    small = small_rows_encoder(batch.schema)
    assert small is not None
    assert small(batch) == kernel_rows(batch)


def test_float_text_matches_arrow_rs_forms() -> None:
    assert [float_text(v) for v in (1.0, 1e16, 1e-5, -2.5e-5, 1e-6, 0.1, -0.0)] == [
        "1.0", "1e16", "0.00001", "-0.000025", "1e-6", "0.1", "-0.0"]
    assert float_text(math.nan) is None and float_text(math.inf) is None


def test_small_path_is_not_used_for_types_only_kernels_print() -> None:
    assert small_rows_encoder(pa.schema([("t", pa.timestamp("s", tz="America/New_York"))])) is None
    assert small_rows_encoder(pa.schema([("f", pa.float32())])) is None


_FIRST_SECOND, _LAST_SECOND = -62_135_596_800, 253_402_300_799  # 0001-01-01T00:00:00, 9999-12-31T23:59:59
_BEYOND = 6_000_000_000_000  # about year 192,000: arrow-rs prints it, Python's calendar cannot


def _instants(per_second: int, beyond: bool) -> st.SearchStrategy[int | None]:
    inside = st.integers(_FIRST_SECOND * per_second, _LAST_SECOND * per_second)
    edges = st.sampled_from([0, -1, 1, 999, 1000, per_second, -per_second, _LAST_SECOND * per_second])
    if not beyond:
        return st.one_of(st.none(), inside, edges)
    return st.one_of(st.none(), inside, edges, st.integers(_LAST_SECOND + 1, _BEYOND).map(lambda v: v * per_second))


@st.composite
def temporal_batches(draw: st.DrawFn) -> pa.RecordBatch:
    """Every unit and zone the small path prints, and values past year 9999 (that batch goes to the
    kernels: every value must print the same either way)."""
    n, beyond = draw(st.integers(1, 12)), draw(st.booleans())

    def column(values: st.SearchStrategy[int | None], t: pa.DataType) -> pa.Array:
        return pa.array(draw(st.lists(values, min_size=n, max_size=n)), pa.int64()).cast(
            pa.int32() if t.bit_width == 32 else pa.int64()).view(t)

    def instants(per_second: int) -> st.SearchStrategy[int | None]:
        return _instants(per_second, beyond)

    ns = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))
    return batch_of(
        s=column(instants(1), pa.timestamp("s")), ms=column(instants(1000), pa.timestamp("ms")),
        us=column(instants(10**6), pa.timestamp("us")), ns=column(ns, pa.timestamp("ns")),
        utc=column(instants(10**6), pa.timestamp("us", tz="UTC")),
        east=column(instants(1000), pa.timestamp("ms", tz="+05:30")),
        west=column(instants(1), pa.timestamp("s", tz="-08:00")),
        d32=column(st.one_of(st.none(), st.integers(-719_162, 2_932_896)), pa.date32()),  # years 1 to 9999
        d64=column(instants(1000), pa.date64()),
        t32=column(st.one_of(st.none(), st.integers(0, 86_399_999)), pa.time32("ms")),
        t64=column(st.one_of(st.none(), st.integers(0, 86_399_999_999_999)), pa.time64("ns")),
    )


@settings(max_examples=80, deadline=None)
@given(temporal_batches())
def test_small_path_prints_temporal_values_as_the_kernels_do(batch: pa.RecordBatch) -> None:
    assert small_rows_encoder(batch.schema) is not None
    small = b"".join(bytes(c) for c in JsonEncoder(batch.schema).batch(batch))
    assert small == kernel_rows(batch)[1:].encode()


# ------------------------------------------------------------------ CSV


def test_csv_header_once_nulls_empty_and_quoting_when_needed() -> None:
    schema = pa.schema([("id", pa.int64()), ("name", pa.string()), ("fare", pa.float64())])
    first = pa.RecordBatch.from_pylist([{"id": 1, "name": "a,b", "fare": 1.5}, {"id": 2, "name": None, "fare": None}],
                                       schema=schema)
    second = big(pa.RecordBatch.from_pylist([{"id": 3, "name": 'say "x"\nnext', "fare": 2.0}], schema=schema))
    body = encode_all(CsvEncoder(schema), [first, second])
    assert body.startswith(b'id,name,fare\n1,"a,b",1.5\n2,,\n3,"say ""x""\nnext",2.0\n')
    assert body.count(b"id,name,fare") == 1
    table = pacsv.read_csv(io.BytesIO(body), convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    assert table.num_rows == 2 + SMALL_ROWS + 1
    assert table.slice(0, 3).to_pylist() == [{"id": 1, "name": "a,b", "fare": 1.5},
                                             {"id": 2, "name": None, "fare": None},
                                             {"id": 3, "name": 'say "x"\nnext', "fare": 2.0}]


def test_csv_without_batches_is_empty_and_temporal_values_are_iso() -> None:
    schema = pa.schema([("t", pa.timestamp("ms"))])
    assert encode_all(CsvEncoder(schema), []) == b""
    batch = pa.RecordBatch.from_pylist([{"t": dt.datetime(2024, 1, 2, 3, 4, 5, 250000)}], schema=schema)
    assert encode_all(CsvEncoder(schema), [batch]) == b"t\n2024-01-02T03:04:05.250\n"


def test_csv_nested_values_as_json_text() -> None:
    batch = batch_of(l=pa.array([[1, 2]]), bin=pa.array([b"\x01"]))
    assert encode_all(CsvEncoder(batch.schema), [batch]) == b'l,bin\n"[1,2]",01\n'


# ------------------------------------------------------------------ text table


def test_text_table_borders_and_null_cells() -> None:
    batch = batch_of(**{"Int64(1)": pa.array([1, None]), "city": pa.array(["Seattle", "Portland"])})
    assert encode_all(TableEncoder(batch.schema), [batch]).decode() == (
        "+----------+----------+\n"
        "| Int64(1) | city     |\n"
        "+----------+----------+\n"
        "| 1        | Seattle  |\n"
        "|          | Portland |\n"
        "+----------+----------+\n")


def test_text_table_without_rows_and_without_columns() -> None:
    assert render_table(["a"], [[]]) == "+---+\n| a |\n+---+\n+---+\n"
    assert render_table([], []) == ""


# ------------------------------------------------------------------ Arrow IPC


def test_arrow_stream_round_trips_batch_by_batch() -> None:
    schema = pa.schema([("a", pa.int64()), ("s", pa.string())])
    batches = [pa.RecordBatch.from_pylist([{"a": i, "s": str(i)}], schema=schema) for i in range(3)]
    encoder = ArrowStreamEncoder(schema)
    parts = [b"".join(encoder.begin())] + [b"".join(encoder.batch(b)) for b in batches] + [b"".join(encoder.end())]
    assert all(parts[1:4])  # every batch leaves as soon as it is written
    reader = ipc.open_stream(b"".join(parts))
    assert [b.to_pylist() for b in reader] == [b.to_pylist() for b in batches]


def test_arrow_stream_without_batches_still_has_the_schema() -> None:
    schema = pa.schema([("a", pa.int64())])
    table = ipc.open_stream(encode_all(ArrowStreamEncoder(schema), [])).read_all()
    assert table.schema == schema and table.num_rows == 0


# ------------------------------------------------------------------ batching


def test_coalesce_sends_the_first_batch_alone_then_merges() -> None:
    schema = pa.schema([("a", pa.int64())])
    small = [pa.RecordBatch.from_pylist([{"a": i}] * 10, schema=schema) for i in range(10)]
    out = list(coalesce(iter(small), rows=25))
    assert [b.num_rows for b in out] == [10, 20, 20, 20, 20, 10]  # never over `rows`
    assert pa.Table.from_batches(out).equals(pa.Table.from_batches(small))


def test_coalesce_bounds_chunk_bytes() -> None:
    wide = pa.RecordBatch.from_pylist([{"s": "x" * 1000}] * 1000)
    out = list(coalesce(iter([wide] * 20), rows=1_000_000, max_bytes=3_000_000))
    assert max(b.nbytes for b in out) <= 3_000_000  # under a gRPC message limit, not just near it


def test_encoder_for_every_media_type() -> None:
    schema = pa.schema([("a", pa.int64())])
    batch = pa.RecordBatch.from_pylist([{"a": 1}], schema=schema)
    assert encode_all(encoder_for("application/json", schema), [batch]) == b'[{"a":1}]'
    assert encode_all(encoder_for("text/csv", schema), [batch]) == b"a\n1\n"
    assert encode_all(encoder_for("text/plain", schema), [batch]).startswith(b"+---+")
    assert ipc.open_stream(encode_all(encoder_for("application/vnd.apache.arrow.stream", schema),
                                      [batch])).read_all().num_rows == 1
