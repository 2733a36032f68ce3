"""Files over plain HTTP, or behind Basic authentication: what DataFusion's HTTP object store cannot
read (it speaks TLS only and sends no credentials). httpx fetches byte ranges; a pyarrow filesystem
hands them to a pyarrow dataset, which DataFusion scans with its projections and filters pushed
down, so a Parquet query still reads only the row groups it needs. (HTTPS without credentials goes
through DataFusion's own store: spiced/connectors/files.py.)"""

from __future__ import annotations

import io
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
from pyarrow import fs

# Each request (a HEAD, a byte range) gets this long: a server that stops answering fails the
# query instead of holding it (upstream's 2026 default `client_timeout`).
TIMEOUT_SECONDS = 30.0


class HttpRangeReader(io.RawIOBase):
    """A seekable, read-only file whose bytes are fetched with Range requests as they are read."""

    def __init__(self, client: httpx.Client, url: str, size: int) -> None:
        self._client, self._url, self._size, self._pos = client, url, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        last = min(self._pos + len(view), self._size) - 1
        if last < self._pos:
            return 0
        r = self._client.get(self._url, headers={"Range": f"bytes={self._pos}-{last}"})
        r.raise_for_status()
        data = r.content if r.status_code == 206 else r.content[self._pos:last + 1]
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


class HttpFiles(fs.FileSystemHandler):
    """Single files at `base` + path; no listing (a plain web server has none)."""

    def __init__(self, base: str, auth: tuple[str, str] | None) -> None:
        self.base = base
        self._client = httpx.Client(auth=httpx.BasicAuth(*auth) if auth else None, timeout=TIMEOUT_SECONDS,
                                    follow_redirects=True)

    def equals(self, other: object) -> bool:
        return isinstance(other, HttpFiles) and other.base == self.base

    def get_type_name(self) -> str:
        return "spiced-http"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[fs.FileInfo]:
        infos = []
        for path in paths:
            r = self._client.head(self.base + path)
            if r.status_code == 404:
                infos.append(fs.FileInfo(path, fs.FileType.NotFound))
                continue
            r.raise_for_status()
            infos.append(fs.FileInfo(path, fs.FileType.File, size=int(r.headers.get("content-length", 0))))
        return infos

    def open_input_file(self, path: str) -> Any:
        [info] = self.get_file_info([path])
        if info.type != fs.FileType.File:
            raise FileNotFoundError(f"{self.base}{path}: not found")
        # Unbuffered: the Parquet reader asks for the footer and the column chunks it needs, each one read.
        return pa.PythonFile(HttpRangeReader(self._client, self.base + path, info.size), mode="r")

    def open_input_stream(self, path: str) -> Any:
        return self.open_input_file(path)

    def get_file_info_selector(self, selector: Any) -> list[fs.FileInfo]:
        raise NotImplementedError("an HTTP server cannot list a folder: name a file")

    def _read_only(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError("read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def dataset(url: str, file_format: str, auth: tuple[str, str] | None, *,
            has_header: bool = True, delimiter: str = ",", quote: str = '"') -> ds.Dataset:
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    filesystem = fs.PyFileSystem(HttpFiles(f"{scheme}://{host}", auth))
    if file_format == "parquet":
        fmt: ds.FileFormat = ds.ParquetFileFormat()
    elif file_format == "csv":
        fmt = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote),
                               read_options=pacsv.ReadOptions(autogenerate_column_names=not has_header))
    else:
        fmt = ds.JsonFileFormat()
    return ds.dataset("/" + path, filesystem=filesystem, format=fmt)
