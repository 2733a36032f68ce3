"""Results leave in the Arrow types every client decodes: Utf8/LargeUtf8, Binary and List, never the
view types (Utf8View, BinaryView, ListView) that DataFusion uses inside. The official Spice SDK's
Arrow library (apache-arrow for JS) cannot decode views, and fails outside the caller's reach.

Checked on the real runtime over Flight DoGet, Flight SQL (ADBC's driver) and the HTTP Arrow stream,
for Parquet and CSV sources, accelerated and read in place, casts, views and aggregates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import httpx
import pyarrow as pa
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest

from tests.support import Runtime, run_spiced, write_pod

SPICEPOD = """\
version: v1
kind: Spicepod
name: wire
datasets:
  - from: file:trips.csv
    name: csv_fast
    acceleration:
      enabled: true
  - from: file:trips.csv
    name: csv_in_place
  - from: file:trips.parquet
    name: pq_fast
    acceleration:
      enabled: true
  - from: file:trips.parquet
    name: pq_in_place
views:
  - name: by_city
    sql: SELECT city, count(*) AS n, array_agg(fare) AS fares FROM pq_in_place GROUP BY city
"""

QUERIES = [
    "SELECT * FROM csv_fast",
    "SELECT * FROM csv_in_place",
    "SELECT * FROM pq_fast",
    "SELECT * FROM pq_in_place",
    "SELECT * FROM by_city",
    "SELECT city, count(*) AS n FROM pq_fast GROUP BY city",
    "SELECT upper(city) AS u, concat(city, '!') AS c, substr(city, 1, 3) AS s FROM pq_in_place",
    "SELECT CAST(id AS TEXT) AS t, CAST(city AS VARCHAR) AS v, 'x'::bytea AS b, [city, city] AS l FROM pq_in_place",
    "SELECT arrow_cast(city, 'Utf8View') AS forced, arrow_cast('x', 'BinaryView') AS bin FROM pq_in_place",
    "SELECT table_name, column_name, data_type FROM information_schema.columns",
]


def _views(schema: pa.Schema) -> list[str]:
    found = []

    def visit(name: str, t: pa.DataType) -> None:
        if t in (pa.string_view(), pa.binary_view()) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
            found.append(f"{name}: {t}")
        for i in range(t.num_fields):
            visit(f"{name}.{t.field(i).name}", t.field(i).type)

    for f in schema:
        visit(f.name, f.type)
    return found


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    work = write_pod(tmp_path_factory.mktemp("wire"), SPICEPOD)
    table = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "city": ["Seattle", "Portland", "Seattle"],
                      "fare": [12.5, 8.25, 30.0], "tag": pa.array([b"a", b"b", None], pa.binary())})
    pq.write_table(table, Path(work) / "trips.parquet")
    with run_spiced(work) as runtime:
        yield runtime


@pytest.mark.parametrize("sql", QUERIES)
def test_flight_doget_sends_no_view_types(rt: Runtime, sql: str) -> None:
    with fl.FlightClient(rt.flight_uri) as client:
        table = client.do_get(fl.Ticket(sql.encode())).read_all()
    assert table.num_rows > 0
    assert _views(table.schema) == []


@pytest.mark.parametrize("sql", QUERIES)
def test_flight_info_announces_the_schema_that_is_sent(rt: Runtime, sql: str) -> None:
    with fl.FlightClient(rt.flight_uri) as client:
        info = client.get_flight_info(fl.FlightDescriptor.for_command(sql.encode()))
        table = client.do_get(info.endpoints[0].ticket).read_all()
    assert info.schema.equals(table.schema)


@pytest.mark.parametrize("sql", QUERIES)
def test_http_arrow_stream_sends_no_view_types(rt: Runtime, sql: str) -> None:
    r = httpx.post(rt.http_url + "/v1/sql", content=sql, headers={"Accept": "application/vnd.apache.arrow.stream"})
    assert r.status_code == 200, r.text
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.num_rows > 0
    assert _views(table.schema) == []


def test_flight_sql_results_and_metadata_send_no_view_types(rt: Runtime) -> None:
    with dbapi.connect(rt.flight_uri, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT city, 'x'::bytea AS b FROM pq_in_place")
            assert _views(cur.fetch_arrow_table().schema) == []
        objects = conn.adbc_get_objects().read_all()
        assert _views(objects.schema) == []
        assert _views(conn.adbc_get_table_schema("pq_in_place")) == []
