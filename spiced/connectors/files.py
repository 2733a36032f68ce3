"""Files: local (`file:`), in S3 (`s3://`) and over HTTP(S) (`http://`, `https://`), read by
DataFusion's own listing tables and object stores. Parquet, CSV and JSON, one file or a folder,
with hive partitions. Filters and projections reach the Parquet reader (row groups and pages
are pruned by their statistics), so a query reads only what it needs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pyarrow as pa
from datafusion import CsvReadOptions, DataFrame, SessionContext

from .params import Checked

FileFormat = Literal["parquet", "csv", "json"]
EXTENSION_FORMATS: dict[str, FileFormat] = {
    ".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json",
}


class FileOptionError(ValueError):
    """A file source that cannot be described: the message is the key and what was expected."""


@dataclass(frozen=True, slots=True)
class S3Store:
    bucket: str
    region: str | None
    endpoint: str | None
    allow_http: bool
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False


@dataclass(frozen=True, slots=True)
class HttpStore:
    base: str  # scheme://host[:port]
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def datafusion_store(self) -> bool:
        """DataFusion's HTTP store speaks TLS only and sends no credentials (else http_files.py)."""
        return self.base.startswith("https://") and self.auth is None


@dataclass(frozen=True, slots=True)
class FileOptions:
    url: str  # a local absolute path, or s3://bucket/key, or http(s)://host/path
    directory: bool
    file_format: FileFormat
    extension: str
    hive_partitioning: bool = False
    has_header: bool = True
    delimiter: str = ","
    quote: str = '"'
    escape: str | None = None
    schema_infer_max_records: int = 1000
    compression: str | None = None
    store: S3Store | HttpStore | None = None
    partition_columns: tuple[str, ...] = ()  # hive partition keys found under a local folder


def listing_options(url: str, directory: bool, checked: Checked) -> FileOptions:
    """The listing parameters every file-like connector shares, checked once."""
    fmt_text = checked.get("file_format")
    suffix = Path(urlsplit(url).path if "://" in url else url).suffix.lower()
    if fmt_text is not None:
        fmt: FileFormat = fmt_text  # type: ignore[assignment]  # checked against Param.one_of
    elif not directory and suffix in EXTENSION_FORMATS:
        fmt = EXTENSION_FORMATS[suffix]
    else:
        raise FileOptionError("params.file_format: Missing required parameter: file_format "
                              f"(cannot tell from {url!r})")
    extension = checked.get("file_extension") or (suffix if not directory and suffix else f".{fmt}")
    infer = checked.get("schema_infer_max_records") or checked.get("csv_schema_infer_max_records") or "1000"
    if not infer.isdigit():
        raise FileOptionError(f"params.schema_infer_max_records: expected a whole number (got {infer!r})")
    delimiter, quote, escape = checked.get("csv_delimiter") or ",", checked.get("csv_quote") or '"', \
        checked.get("csv_escape")
    for key, value in (("csv_delimiter", delimiter), ("csv_quote", quote), ("csv_escape", escape)):
        if value is not None and len(value) != 1:
            raise FileOptionError(f"params.{key}: expected a single character (got {value!r})")
    compression = checked.get("file_compression_type")
    return FileOptions(url=url, directory=directory, file_format=fmt, extension=extension,
                       hive_partitioning=checked.flag("hive_partitioning_enabled"),
                       has_header=checked.flag("csv_has_header"), delimiter=delimiter, quote=quote, escape=escape,
                       schema_infer_max_records=int(infer),
                       compression=compression.upper() if compression else None)


def local_options(target: str, checked: Checked, workdir: Path) -> FileOptions:
    rel = target[2:] if target.startswith("//") else target
    path = Path(rel) if Path(rel).is_absolute() else workdir / rel
    if not path.exists():
        raise FileOptionError(f"from: file not found: {path}")
    options = listing_options(str(path), path.is_dir(), checked)
    if options.hive_partitioning and path.is_dir():
        keys = _hive_keys(p.relative_to(path) for p in sorted(path.rglob("*")) if p.is_file())
        options = replace(options, partition_columns=keys)
    return options


def _hive_keys(relative_files: Iterator[Path]) -> tuple[str, ...]:
    """The `key=value` folder names of the first data file, in order (DataFusion needs them named)."""
    for rel in relative_files:
        parts = rel.parts[:-1]
        if parts and all("=" in part for part in parts):
            return tuple(part.split("=", 1)[0] for part in parts)
    return ()


class FileSource:
    """A dataset over files; the object store, when there is one, is registered once per context."""

    def __init__(self, options: FileOptions) -> None:
        self.options = options

    def _prepare(self, ctx: SessionContext) -> None:
        register_store(ctx, self.options)

    def _partition_cols(self) -> list[tuple[str, str | pa.DataType]] | None:
        o = self.options
        cols = o.partition_columns
        if not cols and o.hive_partitioning and o.directory and isinstance(o.store, S3Store):
            cols = _s3_hive_keys(o.store, o.url)
        return [(c, pa.string()) for c in cols] if cols else None

    def _path(self) -> str:
        o = self.options
        return o.url.rstrip("/") + "/" if o.directory and "://" in o.url else o.url

    def _csv(self) -> CsvReadOptions:
        o = self.options
        return CsvReadOptions(has_header=o.has_header, delimiter=o.delimiter, quote=o.quote, escape=o.escape,
                              schema_infer_max_records=o.schema_infer_max_records, file_extension=o.extension,
                              table_partition_cols=self._partition_cols(),  # type: ignore[arg-type]
                              file_compression_type=o.compression or "")

    def _http_dataset(self) -> Any:
        """For plain HTTP or Basic auth, a pyarrow dataset over httpx Range requests (http_files.py)."""
        from . import http_files

        o = self.options
        assert isinstance(o.store, HttpStore)
        return http_files.dataset(o.url, o.file_format, o.store.auth, has_header=o.has_header,
                                  delimiter=o.delimiter, quote=o.quote)

    def _via_http_files(self) -> bool:
        return not read_by_datafusion(self.options)

    def register(self, ctx: SessionContext, name: str) -> None:
        if self._via_http_files():
            ctx.register_dataset(name, self._http_dataset())
            return
        self._prepare(ctx)
        o, path = self.options, self._path()
        if o.file_format == "parquet":
            ctx.register_parquet(name, path, table_partition_cols=self._partition_cols(), file_extension=o.extension)
        elif o.file_format == "csv":
            ctx.register_csv(name, path, options=self._csv())
        else:
            ctx.register_json(name, path, schema_infer_max_records=o.schema_infer_max_records,
                              file_extension=o.extension, table_partition_cols=self._partition_cols(),
                              file_compression_type=o.compression)

    def frame(self, ctx: SessionContext) -> DataFrame:
        self._prepare(ctx)
        o, path = self.options, self._path()
        if o.file_format == "parquet":
            return ctx.read_parquet(path, table_partition_cols=self._partition_cols(), file_extension=o.extension)
        if o.file_format == "csv":
            return ctx.read_csv(path, options=self._csv())
        return ctx.read_json(path, schema_infer_max_records=o.schema_infer_max_records, file_extension=o.extension,
                             table_partition_cols=self._partition_cols(), file_compression_type=o.compression)

    def read(self, ctx: SessionContext) -> pa.RecordBatchReader:
        if self._via_http_files():
            table = self._http_dataset().to_table()
            return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
        table = self.frame(ctx).to_arrow_table()
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())

    def close(self) -> None:
        pass


_STORES_LOCK = threading.Lock()


def read_by_datafusion(options: FileOptions) -> bool:
    """Whether DataFusion reads the files itself: local, or through an object store it has (S3,
    HTTPS without credentials); else spiced.connectors.http_files does."""
    store = options.store
    return not isinstance(store, HttpStore) or store.datafusion_store


def register_store(ctx: SessionContext, options: FileOptions) -> None:
    """Register the object store DataFusion reads `options`' files through, if they need one."""
    store = options.store
    if store is None or not read_by_datafusion(options):
        return
    with _STORES_LOCK:  # a store is per bucket or host; registering it again replaces it
        # DataFusion appends the store's own bucket or host to the scheme given here.
        if isinstance(store, S3Store):
            ctx.register_object_store("s3://", _s3_store(store), None)
        else:
            from datafusion.object_store import Http

            ctx.register_object_store("https://", Http(store.base), urlsplit(store.base).netloc)


@dataclass(frozen=True, slots=True)
class ObjectStores:
    """The object stores some file datasets are read through, to register in another session (a
    cluster executor's: spiced/cluster/execution.py sends it with each query)."""

    options: tuple[FileOptions, ...]

    def __call__(self, ctx: SessionContext) -> None:
        for options in self.options:
            register_store(ctx, options)


_ENV_LOCK = threading.Lock()
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SKIP_SIGNATURE")


def _s3_store(store: S3Store) -> Any:
    """DataFusion's S3 store. Its Python constructor starts from the process's AWS environment
    variables and has no switch for unsigned requests, so a store is built with those variables
    replaced, for the moment of construction, by what the dataset says: its key and nothing else,
    or `AWS_SKIP_SIGNATURE` for anonymous access. Only `s3_auth: iam_role` uses the environment."""
    import os

    from datafusion.object_store import AmazonS3

    kwargs: dict[str, Any] = {"bucket_name": store.bucket, "region": store.region or "us-east-1",
                              "endpoint": store.endpoint, "allow_http": store.allow_http}
    if store.key is not None:
        kwargs |= {"access_key_id": store.key, "secret_access_key": store.secret,
                   "session_token": store.session_token}
    with _ENV_LOCK:
        saved = {n: os.environ.get(n) for n in _AWS_ENV}
        try:
            if store.key is not None or store.anonymous:
                for n in _AWS_ENV:
                    os.environ.pop(n, None)
            if store.anonymous:
                os.environ["AWS_SKIP_SIGNATURE"] = "true"
            return AmazonS3(**kwargs)
        finally:
            for n, v in saved.items():
                if v is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = v


def _s3_error(key: str, message: str) -> FileOptionError:
    return FileOptionError(f"params.{key}: {message}")


def s3_options(target: str, checked: Checked, workdir: Path) -> FileOptions:
    """`s3://bucket/key-or-folder/`, with upstream's checks of the auth parameters."""
    bucket, _, key = target.removeprefix("//").partition("/")
    if not target.startswith("//") or not bucket:
        raise FileOptionError("from: expected s3://<bucket>/<path>")
    details = " For details, visit: https://spiceai.org/docs/components/data-connectors/s3#auth"
    auth = checked.get("auth")
    access, secret = checked.get("key"), checked.get("secret")
    if auth is None:
        auth = "key" if access or secret else "public"
    if auth not in ("public", "iam_role", "key"):
        raise _s3_error("s3_auth", f"Unsupported S3 auth method '{auth}'. Use 'public', 'iam_role', or 'key' "
                                   f"for `s3_auth` parameter.{details}")
    if auth == "key" and not access:
        raise _s3_error("s3_key", "S3 auth method 'key' requires an AWS access key. Specify an access key "
                                  f"with the `s3_key` parameter.{details}")
    if auth == "key" and not secret:
        raise _s3_error("s3_secret", "S3 auth method 'key' requires an AWS secret access key. Specify a secret "
                                     f"access key with the `s3_secret` parameter.{details}")
    for name in ("key", "secret", "session_token"):
        if auth != "key" and checked.get(name):
            raise _s3_error(f"s3_{name}", f"The 's3_{name}' parameter requires `s3_auth` set to 'key'.{details}")
    endpoint = checked.get("endpoint")
    allow_http = checked.flag("allow_http")
    if endpoint is not None:
        endpoint = endpoint.rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise _s3_error("s3_endpoint", f"The `s3_endpoint` parameter must be a HTTP/S URL, but '{endpoint}' "
                                           "was provided. For details, visit: "
                                           "https://spiceai.org/docs/components/data-connectors/s3#params")
        if endpoint.startswith("http://") and not allow_http:
            raise _s3_error("s3_endpoint", f"The '{endpoint}' is a HTTP URL, but `allow_http` is not enabled. "
                                           "Set the parameter `allow_http: true` and retry.")
    directory = key == "" or key.endswith("/")
    options = listing_options(f"s3://{bucket}/{key}", directory, checked)
    store = S3Store(bucket=bucket, region=checked.get("region"), endpoint=endpoint, allow_http=allow_http,
                    key=access, secret=secret, session_token=checked.get("session_token"),
                    anonymous=auth == "public")
    return replace(options, store=store)


def http_options(scheme: str) -> Callable[[str, Checked, Path], FileOptions]:
    def parse(target: str, checked: Checked, workdir: Path) -> FileOptions:
        url = f"{scheme}:{target}"
        parts = urlsplit(url)
        if not parts.hostname or not target.startswith("//"):
            raise FileOptionError("from: The specified URL in the dataset 'from' is not valid. Ensure the URL is "
                                  "valid and try again.")
        user = unquote(parts.username) if parts.username else checked.get("username")
        password = checked.get("password")
        if parts.password:
            raise FileOptionError("from: a password in the URL is not supported; use the `http_password` parameter")
        if password and not user:
            raise FileOptionError("params.http_username: Missing required parameter: http_username "
                                  "(`http_password` is given)")
        port = checked.get("port")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise FileOptionError("params.http_port: The specified `https_port` parameter was invalid. Specify a "
                                  "valid port number and try again.")
        netloc = parts.hostname + (f":{port or parts.port}" if port or parts.port else "")
        base = f"{scheme}://{netloc}"
        directory = parts.path.endswith("/")
        options = listing_options(base + parts.path, directory, checked)
        store = HttpStore(base, (user, password or "") if user else None)
        if directory and not store.datafusion_store:
            raise FileOptionError("from: an HTTP server cannot list a folder here: name a file")
        return replace(options, store=store)
    return parse


def _s3_hive_keys(store: S3Store, url: str) -> tuple[str, ...]:
    """The partition keys under an S3 folder, from a listing (DataFusion needs them named)."""
    from pyarrow import fs

    endpoint = urlsplit(store.endpoint) if store.endpoint else None
    s3 = fs.S3FileSystem(access_key=store.key, secret_key=store.secret, session_token=store.session_token,
                         anonymous=store.anonymous, region=store.region or "us-east-1",
                         endpoint_override=endpoint.netloc if endpoint else None,
                         scheme=endpoint.scheme if endpoint else "https")
    folder = url.removeprefix("s3://").rstrip("/")
    infos = s3.get_file_info(fs.FileSelector(folder, recursive=True))
    return _hive_keys(Path(i.path).relative_to(folder) for i in infos if i.type == fs.FileType.File)
