"""The Flight SQL service as real clients use it: the ADBC Flight SQL driver (Go) against a real
SpiceFlightServer on an ephemeral port."""

from __future__ import annotations

from collections.abc import Iterator

import adbc_driver_flightsql.dbapi as dbapi
import adbc_driver_manager
import pyarrow as pa
import pytest

from spiced.flight.service import SpiceFlightServer
from spiced.state import RuntimeState
from tests.flight_rig import KEY, TRIPS, make_state, serving


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(make_state(tmp_path_factory.mktemp("adbc"))) as server:
        yield f"grpc://127.0.0.1:{server.port}"


@pytest.fixture
def conn(uri: str) -> Iterator[dbapi.Connection]:
    # autocommit=True: the server has no transactions, and DB-API's default would warn about it.
    with dbapi.connect(uri, autocommit=True) as c:
        yield c


def test_execute_and_fetch_arrow_table(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM trips ORDER BY id")
        table = cur.fetch_arrow_table()
    assert table.schema == TRIPS
    assert table.to_pylist()[1] == {"id": 2, "city": "Portland", "fare": 8.25}
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM generate_series(1, 300000)")
        assert cur.fetchone() == (300000,)


def test_bad_sql_raises_a_clean_error(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur, pytest.raises(adbc_driver_manager.Error) as info:
        cur.execute("SELECT * FROM nope")
    assert "table 'spice.public.nope' not found" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_get_objects_lists_tables_and_columns(conn: dbapi.Connection) -> None:
    [catalog] = conn.adbc_get_objects(catalog_filter="spice").read_all().to_pylist()
    assert catalog["catalog_name"] == "spice"
    schemas = {s["db_schema_name"]: s for s in catalog["catalog_db_schemas"]}
    tables = {t["table_name"]: t for t in schemas["public"]["db_schema_tables"]}
    assert {n: t["table_type"] for n, t in tables.items()} == {"trips": "BASE TABLE", "seattle_trips": "VIEW"}
    assert [c["column_name"] for c in tables["trips"]["table_columns"]] == ["id", "city", "fare"]
    only = conn.adbc_get_objects(depth="tables", db_schema_filter="public", table_name_filter="seattle%")
    [catalog] = only.read_all().to_pylist()
    [public] = catalog["catalog_db_schemas"]
    assert [t["table_name"] for t in public["db_schema_tables"]] == ["seattle_trips"]


def test_get_table_schema_and_types(conn: dbapi.Connection) -> None:
    assert conn.adbc_get_table_schema("trips") == TRIPS
    assert conn.adbc_get_table_schema("seattle_trips", catalog_filter="spice", db_schema_filter="public") == TRIPS
    assert conn.adbc_get_table_types() == ["BASE TABLE", "VIEW"]
    with pytest.raises(adbc_driver_manager.Error):
        conn.adbc_get_table_schema("nope")


def test_get_info_names_the_server(conn: dbapi.Connection) -> None:
    info = conn.adbc_get_info()
    assert info["vendor_name"] == "Spice.ai"
    assert info["vendor_version"]
    assert info["vendor_arrow_version"] == "1.3"


def test_prepared_statement(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        cur.adbc_prepare("SELECT city, fare FROM trips WHERE fare > 10 ORDER BY fare")
        cur.execute("SELECT city, fare FROM trips WHERE fare > 10 ORDER BY fare")
        assert cur.fetchall() == [("Seattle", 12.5), ("Seattle", 30.0)]
        assert cur.adbc_execute_schema("SELECT id FROM trips") == pa.schema([("id", pa.int64())])


@pytest.fixture(scope="module")
def keyed_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state: RuntimeState = make_state(tmp_path_factory.mktemp("adbc-keys"), keys=(KEY,))
    server: SpiceFlightServer
    with serving(state) as server:
        yield f"grpc://127.0.0.1:{server.port}"


def test_username_password_with_api_keys(keyed_uri: str) -> None:
    # The driver performs a Basic handshake and replays the returned bearer on every call.
    with dbapi.connect(keyed_uri, db_kwargs={"username": "", "password": KEY}, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) AS n FROM trips")
            assert cur.fetchone() == (3,)
        assert conn.adbc_get_table_schema("trips") == TRIPS


@pytest.mark.parametrize("db_kwargs", [{"username": "", "password": "wrong"}, {}])
def test_wrong_or_missing_api_key_is_unauthenticated(keyed_uri: str, db_kwargs: dict[str, str]) -> None:
    with pytest.raises(adbc_driver_manager.Error, match="UNAUTHENTICATED"):
        with dbapi.connect(keyed_uri, db_kwargs=db_kwargs, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchall()


def test_api_key_as_authorization_header(keyed_uri: str) -> None:
    headers = {"adbc.flight.sql.rpc.call_header.authorization": f"Bearer {KEY}"}
    with dbapi.connect(keyed_uri, db_kwargs=headers, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == (1,)
