"""`POST /v1/sql` on the real runtime: the JSON body with parameters (`{"sql", "parameters"}` under
`Content-Type: application/json`), the `application/vnd.spiceai.sql.v1+json` envelope, their 400s,
and the official JavaScript SDK (`sqlJson()` and parameterised `sql()`) over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from spiced.http.params import BAD_NUMBER, NESTED, NOT_ARRAY_OR_OBJECT
from tests.jsclient import run_sdk, steps
from tests.support import Runtime, run_spiced, write_pod

VND = "application/vnd.spiceai.sql.v1+json"
JSON_BODY = {"Content-Type": "application/json"}
TRIPS = [{"id": 1, "city": "Seattle", "fare": 12.5}, {"id": 2, "city": "Portland", "fare": 8.25},
         {"id": 3, "city": "Seattle", "fare": 30.0}]
DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
PARSE = "Failed to parse the request body as JSON: "


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("formats"))) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def http(rt: Runtime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rt.http_url, timeout=30) as client:
        yield client


def post_json(http: httpx.Client, body: Any, *, accept: str | None = None,
              content_type: str = "application/json") -> httpx.Response:
    """POST /v1/sql with a JSON body (`body` as it is when it is already text)."""
    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
    return http.post("/v1/sql", content=body if isinstance(body, str) else json.dumps(body), headers=headers)


def rows(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def envelope(r: httpx.Response) -> dict[str, Any]:
    assert (r.status_code, r.headers["content-type"]) == (200, VND), r.text
    out: dict[str, Any] = r.json()
    assert list(out) == ["row_count", "schema", "data"]
    return out


def field(name: str, data_type: Any, nullable: bool) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "nullable": nullable, "dict_id": 0, "dict_is_ordered": False,
            "metadata": {}}


# ------------------------------------------------------------------ parameters


def test_positional_parameters_take_upstreams_implicit_types(http: httpx.Client) -> None:
    sql = ("SELECT arrow_typeof($1) AS i, arrow_typeof($2) AS f, arrow_typeof($3) AS s, arrow_typeof($4) AS b, "
           "arrow_typeof($5) AS n, arrow_typeof($6) AS whole_float, arrow_typeof($7) AS beyond_i64")
    r = post_json(http, {"sql": sql, "parameters": [7, 2.5, "x", True, None, 2.0, 2**63]})
    assert rows(r) == [{"i": "Int64", "f": "Float64", "s": "Utf8", "b": "Boolean", "n": "Utf8",
                        "whole_float": "Float64", "beyond_i64": "Float64"}]


def test_positional_parameters_with_each_json_type(http: httpx.Client) -> None:
    r = post_json(http, {"sql": "SELECT $1 AS i, $2 AS f, $3 AS s, $4 AS b, $5 AS n, $1 + 1 AS next",
                         "parameters": [-9223372036854775808, 0.1, "é \"q\"", False, None]})
    assert rows(r) == [{"i": -9223372036854775808, "f": 0.1, "s": "é \"q\"", "b": False,
                        "next": -9223372036854775807}]  # the null is omitted, as every JSON null field


def test_a_string_parameter_compared_against_a_column(http: httpx.Client) -> None:
    r = post_json(http, {"sql": "SELECT * FROM trips WHERE city = $1 ORDER BY id", "parameters": ["Seattle"]})
    assert rows(r) == [TRIPS[0], TRIPS[2]]
    r = post_json(http, {"sql": "SELECT * FROM trips WHERE city = $1 AND fare > $2", "parameters": ["Seattle", 20]})
    assert rows(r) == [TRIPS[2]]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM trips WHERE city = :city AND fare < :most ORDER BY id",
    "SELECT * FROM trips WHERE city = $city AND fare < $most ORDER BY id",
    "SELECT * FROM trips WHERE city = :city AND fare < $most ORDER BY id",
])
def test_named_parameters_bind_colon_and_dollar_names(http: httpx.Client, sql: str) -> None:
    r = post_json(http, {"sql": sql, "parameters": {"city": "Seattle", "most": 20.5}})
    assert rows(r) == [TRIPS[0]]


def test_named_parameters_with_each_json_type(http: httpx.Client) -> None:
    r = post_json(http, {"sql": "SELECT :i AS i, :f AS f, :s AS s, :b AS b, :n AS n, arrow_typeof(:n) AS nt",
                         "parameters": {"i": 41, "f": 1e-3, "s": "Portland", "b": True, "n": None}})
    assert rows(r) == [{"i": 41, "f": 0.001, "s": "Portland", "b": True, "nt": "Utf8"}]


def test_upstream_docs_example(http: httpx.Client) -> None:
    r = post_json(http, {"sql": "SELECT :foo + 1 AS the_answer", "parameters": {"foo": 41}})
    assert rows(r) == [{"the_answer": 42}]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""])
def test_a_utf8_charset_parameter_is_still_json(http: httpx.Client, content_type: str) -> None:
    r = post_json(http, {"sql": "SELECT $1 AS city", "parameters": ["Seattle"]}, content_type=content_type)
    assert rows(r) == [{"city": "Seattle"}]


@pytest.mark.parametrize("parameters", [[], {}, None])
def test_no_parameters_in_a_json_body(http: httpx.Client, parameters: Any) -> None:
    body: dict[str, Any] = {"sql": "SELECT count(*) AS n FROM trips"}
    if parameters is not None:
        body["parameters"] = parameters
    assert rows(post_json(http, body)) == [{"n": 3}]


def test_json_parameters_with_every_accept_format(http: httpx.Client) -> None:
    body = {"sql": "SELECT id, city FROM trips WHERE id = $1", "parameters": [2]}
    assert post_json(http, body, accept="text/csv").text == "id,city\n2,Portland\n"
    out = envelope(post_json(http, body, accept=VND))
    assert (out["row_count"], out["data"]) == (1, [{"id": 2, "city": "Portland"}])


# ------------------------------------------------------------------ 400s


@pytest.mark.parametrize(("body", "message"), [
    ({"sql": "SELECT $1", "parameters": [[1, 2]]}, NESTED),
    ({"sql": "SELECT $1", "parameters": [1, {"a": 1}]}, NESTED),
    ({"sql": "SELECT :a", "parameters": {"a": {"b": 1}}}, NESTED),
    ({"sql": "SELECT :a", "parameters": {"a": []}}, NESTED),
    ({"sql": "SELECT $1", "parameters": 5}, NOT_ARRAY_OR_OBJECT),
    ({"sql": "SELECT $1", "parameters": "Seattle"}, NOT_ARRAY_OR_OBJECT),
    ({"sql": "SELECT $1", "parameters": True}, NOT_ARRAY_OR_OBJECT),
    ('{"sql": "SELECT $1", "parameters": [1e400]}', BAD_NUMBER),
    ({"parameters": [1]}, DESERIALIZE + "missing field `sql`"),
    ({"sql": 5}, DESERIALIZE + "sql: invalid type: integer `5`, expected a string"),
    ({"sql": None}, DESERIALIZE + "sql: invalid type: null, expected a string"),
    ({"sql": ["SELECT 1"]}, DESERIALIZE + "sql: invalid type: sequence, expected a string"),
    (["SELECT 1"], DESERIALIZE + "invalid type: sequence, expected an object with a `sql` field"),
    ("SELECT 1", PARSE + "Expecting value: line 1 column 1 (char 0)"),
    ('{"sql": "SELECT 1"', PARSE + "Expecting ',' delimiter: line 1 column 19 (char 18)"),
    ("", PARSE + "Expecting value: line 1 column 1 (char 0)"),
    ('{"sql": "SELECT $1", "parameters": [NaN]}', PARSE + "NaN is not valid JSON"),
    ('{"sql": "SELECT \\ud800"}', PARSE + "lone surrogate in a string escape"),
    ("[" * 100_000, None),  # deeper than the parser goes: still a 400
])
def test_bad_json_bodies_are_400_with_a_message(http: httpx.Client, body: Any, message: str | None) -> None:
    r = post_json(http, body)
    assert (r.status_code, r.headers["content-type"]) == (400, "text/plain; charset=utf-8"), r.text
    if message is None:
        assert r.text.startswith(PARSE)
    else:
        assert r.text == message


NO_VALUE = "Error during planning: No value found for placeholder with name "


@pytest.mark.parametrize(("body", "message"), [
    ({"sql": "SELECT $2 AS x", "parameters": [1]}, NO_VALUE + "$2"),
    ({"sql": "SELECT $x", "parameters": {"y": 1}}, NO_VALUE + "$x"),
    ({"sql": "SELECT $1"}, "Execution error: Placeholder '$1' was not provided a value for execution."),
    ({"sql": "SELECT * FROM trips WHERE id = $1", "parameters": {}},
     "Execution error: Placeholder '$1' was not provided a value for execution."),
    ({"sql": "SELECT * FROM nope WHERE id = $1", "parameters": [1]},
     "Error during planning: table 'spice.public.nope' not found"),
])
def test_missing_placeholder_values_are_400_with_datafusions_text(http: httpx.Client, body: Any, message: str) -> None:
    r = post_json(http, body)
    assert (r.status_code, r.text) == (400, f"Failed to execute query: {message}")


def test_invalid_utf8_in_a_json_body_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/sql", content=b'{"sql": "SELECT \xff"}', headers=JSON_BODY)
    assert r.status_code == 400 and r.text.startswith("Request body didn't contain valid UTF-8: ")


# ------------------------------------------------------------------ other content types: the body is the SQL


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"}, {"Content-Type": "application/sql"},
                                     {"Content-Type": "application/x-www-form-urlencoded"}])
def test_plain_sql_bodies_still_work(http: httpx.Client, headers: dict[str, str]) -> None:
    r = http.post("/v1/sql", content="SELECT * FROM trips ORDER BY id", headers=headers)
    assert (r.status_code, r.headers["content-type"], r.json()) == (200, "application/json", TRIPS)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json; charset=latin-1", "application/jsonl",
                                          "application/vnd.api+json"])
def test_only_application_json_reads_the_body_as_json(http: httpx.Client, content_type: str) -> None:
    r = post_json(http, {"sql": "SELECT 1"}, content_type=content_type)
    assert r.status_code == 400
    assert r.text.startswith("Failed to execute query: SQL error: ParserError(")  # the JSON text was run as SQL


# ------------------------------------------------------------------ the vnd.spiceai envelope


def test_envelope_matches_upstreams_example_byte_for_byte(http: httpx.Client) -> None:
    r = http.post("/v1/sql", content="SELECT 1 AS n", headers={"Accept": VND})
    assert (r.status_code, r.headers["content-type"]) == (200, VND)
    assert r.content == (b'{"row_count":1,"schema":{"fields":[{"name":"n","data_type":"Int64","nullable":false,'
                         b'"dict_id":0,"dict_is_ordered":false,"metadata":{}}],"metadata":{}},"data":[{"n":1}]}')


def test_envelope_of_a_table_query(http: httpx.Client) -> None:
    sql = "SELECT * FROM trips ORDER BY id"
    out = envelope(http.post("/v1/sql", content=sql, headers={"Accept": VND}))
    assert out["row_count"] == 3
    assert out["data"] == http.post("/v1/sql", content=sql).json() == TRIPS
    assert out["schema"] == {"fields": [field("id", "Int64", True), field("city", "Utf8", True),
                                        field("fare", "Float64", True)], "metadata": {}}


def test_envelope_of_an_empty_result_has_an_empty_schema(http: httpx.Client) -> None:
    r = http.post("/v1/sql", content="SELECT * FROM trips WHERE id > 100", headers={"Accept": VND})
    assert envelope(r) == {"row_count": 0, "schema": {}, "data": []}


def test_envelope_types_of_timestamp_decimal_list_struct_and_others(http: httpx.Client) -> None:
    sql = ("SELECT CAST('2024-01-02T03:04:05' AS TIMESTAMP) AS ts, "
           "arrow_cast('2024-01-02T03:04:05Z', 'Timestamp(Microsecond, Some(\"UTC\"))') AS tsz, "
           "CAST(1.5 AS DECIMAL(5,2)) AS d, make_array(1, 2, 3) AS l, named_struct('a', 1, 'b', 'x') AS s, "
           "CAST('2024-01-02' AS DATE) AS day, NULL AS nothing, X'00ff' AS bin, arrow_cast(1, 'Int32') AS i32, "
           "arrow_cast('x', 'LargeUtf8') AS big")
    out = envelope(http.post("/v1/sql", content=sql, headers={"Accept": VND}))
    assert out["row_count"] == 1
    assert out["data"] == http.post("/v1/sql", content=sql).json()
    assert out["schema"]["fields"] == [
        field("ts", {"Timestamp": ["Nanosecond", None]}, False),
        field("tsz", {"Timestamp": ["Microsecond", "UTC"]}, False),
        field("d", {"Decimal128": [5, 2]}, False),
        field("l", {"List": field("item", "Int64", True)}, True),
        field("s", {"Struct": [field("a", "Int64", True), field("b", "Utf8", True)]}, True),
        field("day", "Date32", False),
        field("nothing", "Null", True),
        field("bin", "Binary", False),
        field("i32", "Int32", False),
        field("big", "LargeUtf8", False),
    ]


def test_envelope_of_many_batches(http: httpx.Client) -> None:
    sql = "SELECT value FROM generate_series(1, 100000)"
    out = envelope(http.post("/v1/sql", content=sql, headers={"Accept": VND}))
    assert out["row_count"] == len(out["data"]) == 100_000
    assert out["data"][0] == {"value": 1} and out["data"][-1] == {"value": 100_000}


def test_envelope_failing_on_a_late_batch_is_still_a_400(http: httpx.Client) -> None:
    # As plain JSON this cuts a 200 stream short; the envelope is sent whole, so it can say 400.
    sql = "SELECT value, 1 / (CASE WHEN value > 50000 THEN 0 ELSE 1 END) AS x FROM generate_series(1, 200000)"
    r = http.post("/v1/sql", content=sql, headers={"Accept": VND})
    assert (r.status_code, r.text) == (400, "Failed to execute query: Arrow error: Divide by zero error")
    assert http.post("/v1/sql", content="SELECT 1 AS one").json() == [{"one": 1}]


def test_envelope_wins_by_accept_ranking(http: httpx.Client) -> None:
    r = http.post("/v1/sql", content="SELECT 1 AS n", headers={"Accept": f"text/csv;q=0.5, {VND}"})
    assert r.headers["content-type"] == VND
    r = http.post("/v1/sql", content="SELECT 1 AS n", headers={"Accept": "application/vnd.spiceai.nsql.v1+json"})
    assert r.headers["content-type"] == "application/json"  # NSQL's envelope is not served: default JSON


# ------------------------------------------------------------------ the official JavaScript SDK over HTTP


def sdk_http_params(http_url: str, queries: list[dict[str, Any]], timeout: float = 60) -> list[dict[str, Any]]:
    """`sql(sql, {parameters})` over HTTP only (the `sqlHttp` step of tests/js/sdk_client.mjs), each on a
    new SpiceClient with setMaxRetries(0); one result per query: {"rows": [...]} or {"error": "<message>"}."""
    job = {"httpUrl": http_url, "maxRetries": 0,
           "steps": [{"call": "sqlHttp", "query": q["sql"], "parameters": q["parameters"], "continueOnError": True}
                     for q in queries]}
    out = run_sdk(job, timeout, check=False)
    assert len(out["results"]) == len(queries), out.get("error") or out["stderr"][-3000:]
    return [{"rows": r["rows"]} if "rows" in r else {"error": r["error"]} for r in out["results"]]


def test_sdk_sql_json_reads_the_envelope_over_http(rt: Runtime) -> None:
    queries = ["SELECT * FROM trips ORDER BY id", "SELECT city, count(*) AS n FROM trips GROUP BY city ORDER BY city",
               "SELECT * FROM trips WHERE id > 100"]
    out = run_sdk({"httpUrl": rt.http_url, "steps": steps("sqlJson", queries), "maxRetries": 0})
    assert [(r["rows"], r["row_count"]) for r in out["results"]] == [
        (TRIPS, 3), ([{"city": "Portland", "n": 1}, {"city": "Seattle", "n": 2}], 2), ([], 0)]


def test_sdk_sql_with_positional_and_named_parameters_over_http(rt: Runtime) -> None:
    results = sdk_http_params(rt.http_url, [
        {"sql": "SELECT * FROM trips WHERE city = $1 ORDER BY id", "parameters": ["Seattle"]},
        {"sql": "SELECT id, city FROM trips WHERE city = $1 AND fare > $2", "parameters": ["Seattle", 20]},
        {"sql": "SELECT * FROM trips WHERE city = $city AND fare < $most",
         "parameters": {"city": "Seattle", "most": 20.5}},
        {"sql": "SELECT id FROM trips WHERE city = :city ORDER BY id", "parameters": {"city": "Portland"}},
        {"sql": "SELECT $1 AS s, $2 AS i, $3 AS f, $4 AS b", "parameters": ["x", 7, 2.5, True]},
        {"sql": "SELECT $2 AS x", "parameters": [1]},
    ])
    assert results == [
        {"rows": [TRIPS[0], TRIPS[2]]},
        {"rows": [{"id": 3, "city": "Seattle"}]},
        {"rows": [TRIPS[0]]},
        {"rows": [{"id": 2}]},
        {"rows": [{"s": "x", "i": 7, "f": 2.5, "b": True}]},
        {"error": f"HTTP query failed with status 400: Failed to execute query: {NO_VALUE}$2"},
    ]
