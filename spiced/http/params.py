"""The JSON form of a `POST /v1/sql` body, `{"sql": "...", "parameters": [...] | {...}}`, and its
parameters as values for the engine's placeholders.

The body is read as JSON only under `Content-Type: application/json` (a `charset=utf-8`
parameter is allowed); any other body is the SQL text itself, as before. Parameters are typed
the way upstream's `param_utils` types them: a JSON integer that fits i64 → Int64, any other
number → Float64, string → Utf8, bool → Boolean, null → a Utf8 null. An array binds `$1`, `$2`…;
an object binds `$name` and `:name` by its keys. `parameters` absent or null means none.

Every problem is a `RequestError`, whose text is the 400 body. Upstream's texts for parameters
are kept; for the body itself upstream's exact wording is not known, so the texts follow axum's
JSON rejections ("Failed to parse the request body as JSON: …").
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

from ..engine import Params

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_PARSE = "Failed to parse the request body as JSON: "
_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
NESTED = "Nested arrays or objects are not supported as parameter values"
NOT_ARRAY_OR_OBJECT = "Parameters must be a JSON array or an object"
BAD_NUMBER = "Unsupported JSON number format in query parameter. Use integers or floating point values."


class RequestError(Exception):
    """A request body that cannot be run; the message is the 400 body."""


class _HugeNumber(str):
    """A JSON number beyond f64 (`1e400`): kept as its text so a parameter can say what is wrong."""


def is_json_body(content_type: str | None) -> bool:
    """`application/json`, with no parameter other than `charset=utf-8`."""
    media, *params = (p.strip() for p in (content_type or "").split(";"))
    if media.lower() != "application/json":
        return False
    for param in filter(None, params):
        name, _, value = param.partition("=")
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() != "utf-8":
            return False
    return True


def parse_sql_request(text: str) -> tuple[str, Params | None]:
    """The SQL text and its parameters (None when the body has none)."""
    body = load_json(text)
    if not isinstance(body, dict):
        raise RequestError(f"{_DESERIALIZE}invalid type: {describe_json(body)}, expected an object with a `sql` field")
    if "sql" not in body:
        raise RequestError(f"{_DESERIALIZE}missing field `sql`")
    sql = body["sql"]
    if not isinstance(sql, str) or isinstance(sql, _HugeNumber):
        raise RequestError(f"{_DESERIALIZE}sql: invalid type: {describe_json(sql)}, expected a string")
    parameters = body.get("parameters")
    return _utf8(sql), None if parameters is None else json_parameters(parameters)


def json_parameters(value: Any) -> Params:
    """A JSON array as positional values ("1", "2"…), a JSON object as named ones."""
    if isinstance(value, list):
        return {str(position): _scalar(item) for position, item in enumerate(value, 1)}
    if isinstance(value, dict):
        return {_utf8(name): _scalar(item) for name, item in value.items()}
    raise RequestError(NOT_ARRAY_OR_OBJECT)


def _scalar(value: Any) -> pa.Scalar:
    if value is None:
        return pa.scalar(None, pa.string())
    if isinstance(value, _HugeNumber):
        raise RequestError(BAD_NUMBER)
    if isinstance(value, bool):
        return pa.scalar(value, pa.bool_())
    if isinstance(value, int):
        return pa.scalar(value, pa.int64())
    if isinstance(value, float):
        return pa.scalar(value, pa.float64())
    if isinstance(value, str):
        return pa.scalar(_utf8(value), pa.string())
    raise RequestError(NESTED)


def load_json(text: str) -> Any:
    try:
        return json.loads(text, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(f"{_PARSE}{e}") from None


def _integer(text: str) -> int | float | _HugeNumber:
    """An integer beyond i64 is a float, as serde_json reads it."""
    value = int(text)
    return value if _I64_MIN <= value <= _I64_MAX else _float(text)


def _float(text: str) -> float | _HugeNumber:
    value = float(text)
    return value if math.isfinite(value) else _HugeNumber(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")  # NaN, Infinity, -Infinity: a Python extension


def _utf8(text: str) -> str:
    """JSON allows `\\ud800` escapes that no UTF-8 string can hold; serde_json refuses them too."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{_PARSE}lone surrogate in a string escape") from None
    return text


def describe_json(value: Any) -> str:
    """serde's words for an unexpected JSON value."""
    if value is None:
        return "null"
    if isinstance(value, _HugeNumber):
        return f"number `{value}`"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return "sequence" if isinstance(value, list) else "map"
