"""Real object stores on 127.0.0.1 for the S3 and HTTP(S) data connector tests, each its own process.

    with s3_server(tmp_path / "s3") as s3:                 # moto, path-style, any credentials accepted
        s3.create_bucket("data")                           # public=True: anonymous GET/HEAD/list allowed
        s3.put("data", "trips/t.parquet", local_file)      # bytes or a Path; put_tree() for a folder
        s3.endpoint, s3.region, s3.key, s3.secret          # "http://127.0.0.1:PORT", "us-east-1", fixed test keys
        s3.requests()                                      # what the server was asked (the library's own calls
                                                           #   excluded): method, path, query, range, status...
    with s3_server(tmp_path / "s3", auth=True) as s3:      # SigV4 checked: only s3.key/s3.secret sign validly

    with http_file_server(root, tls=pki.server, basic_auth=("alice", "pw")) as web:
        web.url                                            # "https://127.0.0.1:PORT" (files under root)
        web.requests()                                     # method, path, range, authorization (present?), status

What DataFusion 55's own stores need to reach these (found by experiment, see tests/test_objectstores.py):
  - `AmazonS3(...)` builds from `AmazonS3Builder::from_env()`: every `AWS_*` variable of the process counts;
    anonymous access needs `AWS_SKIP_SIGNATURE=true` (no constructor argument), otherwise a store without keys
    asks the instance metadata service. Requests are path-style unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`.
  - `Http(url)` refuses plain `http://` ("builder error": no allow_http), drops `user:password@` from the URL (only
    its origin is kept) and cannot send any header, so Basic auth is out of its reach; folder listing is WebDAV
    PROPFIND, which this server answers 405 (single files work: HEAD, then ranged GETs).
  - TLS trust: rustls with the native roots, read when the store is built: `SSL_CERT_FILE=<CA or bundle>` or
    `SSL_CERT_DIR=<folder holding the CA>` in the process environment (`trust_env()`); without it: "error
    sending request" after 10 retries (~5 s).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from tests.pki import Issued

REPO = Path(__file__).resolve().parent.parent
S3_KEY = "AKIAOBJECTSTORESTEST"  # AKIA...: moto looks such keys up among its IAM users when auth is on
S3_SECRET = "objectstores/test/secret/key/0123456789"
S3_REGION = "us-east-1"
ADMIN_HEADER = "X-Objectstores-Admin"  # tests/s3_launcher.py serves but does not log requests carrying it
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Request:
    """One request as the server saw it, logged before its response started."""

    method: str
    path: str  # as sent, percent-encoding kept; for S3 path-style: /bucket/key
    query: str
    range: str | None  # the Range header, e.g. "bytes=0-7470"
    authorization: bool  # credentials came: an Authorization header (or, S3, a presigned URL's signature)
    status: int
    access_key: str | None = None  # S3: the key id the request was signed with
    http_version: str | None = None  # HTTP file server: "1.1" or "2"

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """The inclusive (first, last) of a single `bytes=a-b` range; None without a Range or for other forms."""
        if not self.range or not self.range.startswith("bytes="):
            return None
        first, _, last = self.range[len("bytes="):].partition("-")
        return (int(first), int(last)) if first.isdigit() and last.isdigit() else None


def trust_env(ca: Path) -> dict[str, str]:
    """Environment that makes DataFusion's object stores (reqwest + rustls, native roots) trust `ca`.

    Once SSL_CERT_FILE (or SSL_CERT_DIR) is set, rustls-native-certs loads those instead of the platform store,
    so the file may need to be a bundle when public CAs matter too. Give it to the runtime under test
    (`run_spiced(..., env=trust_env(pki.ca.cert))`), or set it in this process before the store is built.
    """
    return {"SSL_CERT_FILE": str(ca)}


@dataclass
class _Process:
    """A launcher subprocess: started, awaited until it prints its port, stopped for sure."""

    proc: subprocess.Popen[bytes]
    log_path: Path  # the launcher's stderr (tracebacks, werkzeug/Hypercorn messages)
    request_log: Path
    port: int = 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def requests(self) -> list[Request]:
        text = self.request_log.read_text() if self.request_log.exists() else ""
        return [Request(**json.loads(line)) for line in text.splitlines() if line.endswith("}")]

    def clear_requests(self) -> None:
        """Forget what was logged so far (the launcher appends with O_APPEND, so truncation is safe)."""
        self.request_log.write_text("")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; also closes our end of its stdin, its fallback exit signal."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _start(module: str, args: list[str], directory: Path, name: str) -> _Process:
    """Run `python -m module args...` from the repository root; stderr to `directory/name.log`."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path, request_log = directory / f"{name}.log", directory / f"{name}-requests.jsonl"
    request_log.write_text("")
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, "--request-log", str(request_log), *args],
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    process = _Process(proc, log_path, request_log)
    try:
        process.port = _await_port(process, name)
    except BaseException:
        process.stop()
        raise
    return process


def _await_port(process: _Process, name: str) -> int:
    """Read the launcher's one stdout line, `... listening on port N`, within START_TIMEOUT."""
    stdout: IO[bytes] | None = process.proc.stdout
    assert stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if select.select([stdout], [], [], left)[0]:
            line = stdout.readline().decode(errors="replace")
            if " listening on port " in line:
                return int(line.rsplit(" ", 1)[1])
            if not line:  # EOF: the launcher exited
                process.proc.wait(5)
                break
    raise RuntimeError(f"{name} did not start (exit code {process.proc.poll()}); log tail:\n{process.log_tail()}")


# --- S3 ------------------------------------------------------------------------------------------------------


@dataclass
class _Served:
    """A server run as a subprocess that records the requests it was sent."""

    process: _Process

    @property
    def port(self) -> int:
        return self.process.port

    def requests(self) -> list[Request]:
        """Every request not made by this library, in arrival order."""
        return self.process.requests()

    def clear_requests(self) -> None:
        self.process.clear_requests()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)


@dataclass
class S3Server(_Served):
    """moto's S3 in a subprocess (tests/s3_launcher.py); path-style URLs: {endpoint}/{bucket}/{key}."""

    process: _Process
    endpoint: str
    ca: Path | None = None  # the CA the library's own client trusts when the server speaks TLS
    region: str = S3_REGION
    key: str = S3_KEY
    secret: str = S3_SECRET
    auth: bool = False  # True: signatures are verified, only key/secret sign validly

    @cached_property
    def client(self) -> Any:
        """A boto3 S3 client for setting up data; its requests carry ADMIN_HEADER so they stay out of requests()."""
        import boto3  # type: ignore[import-untyped]  # a dependency of moto[server]; no type information
        from botocore.config import Config  # type: ignore[import-untyped]

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                              aws_access_key_id=self.key, aws_secret_access_key=self.secret,
                              verify=str(self.ca) if self.ca else True,
                              config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        def mark_admin(request: Any, **_: Any) -> None:
            request.headers[ADMIN_HEADER] = "1"

        client.meta.events.register("before-sign.s3", mark_admin)
        return client

    def create_bucket(self, name: str, public: bool = False) -> None:
        """A bucket; `public` adds a policy granting everyone read and list, as a public AWS bucket would.

        The policy also names s3:HeadObject, which is no AWS action: moto checks HEAD of an object against it.
        """
        self.client.create_bucket(Bucket=name)
        if public:
            self.client.put_bucket_policy(Bucket=name, Policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                               "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                               "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}],
            }))

    def put(self, bucket: str, key: str, data: bytes | Path) -> None:
        body = data.read_bytes() if isinstance(data, Path) else data
        self.client.put_object(Bucket=bucket, Key=key, Body=body)

    def put_tree(self, bucket: str, directory: Path, prefix: str = "") -> list[str]:
        """Upload every file under `directory` as `prefix` + its relative path (e.g. a hive `year=2024/` tree)."""
        keys = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(directory).as_posix()
            self.put(bucket, key, path)
            keys.append(key)
        return keys

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def url(self, bucket: str, key: str = "") -> str:
        """The `s3://bucket/key` URL of an object or (key ending in "/") a folder."""
        return f"s3://{bucket}/{key}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listed = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]

@contextmanager
def s3_server(directory: Path, *, auth: bool = False, tls: Issued | None = None,
              ca: Path | None = None) -> Iterator[S3Server]:
    """Start moto's S3 on 127.0.0.1:<free port> (about 1 s), stop it on exit, whatever happens in the block.

    `auth=True`: requests must be signed with S3_KEY/S3_SECRET (wrong secret: 403 SignatureDoesNotMatch, unknown
    key: 403 InvalidAccessKeyId); without it moto accepts any credentials. In both modes an unsigned request gets
    only what a public bucket grants. `tls`: serve HTTPS with that certificate (`ca`, its issuer, is then needed
    for the library's own client). `directory` keeps the server's log and request log.
    """
    if tls and not ca:
        raise ValueError("tls needs ca: the library's own S3 client verifies the server")
    args = ["--auth", S3_KEY, S3_SECRET] if auth else []
    if tls:
        args += ["--tls", str(tls.cert), str(tls.key)]
    process = _start("tests.s3_launcher", args, directory, "s3")
    try:
        scheme = "https" if tls else "http"
        yield S3Server(process, f"{scheme}://127.0.0.1:{process.port}", ca=ca, auth=auth)
    finally:
        process.stop()


# --- HTTP(S) files -------------------------------------------------------------------------------------------


@dataclass
class HttpFileServer(_Served):
    """Starlette StaticFiles under Hypercorn in a subprocess (tests/http_launcher.py): GET/HEAD with Ranges."""

    process: _Process
    url: str  # "http(s)://127.0.0.1:PORT", no trailing slash
    root: Path
    basic_auth: tuple[str, str] | None = None

    def url_for(self, relative: str) -> str:
        return f"{self.url}/{relative.lstrip('/')}"

@contextmanager
def http_file_server(root: Path, *, tls: Issued | None = None, basic_auth: tuple[str, str] | None = None,
                     directory: Path | None = None) -> Iterator[HttpFileServer]:
    """Serve the files under `root` on 127.0.0.1:<free port> (about 0.5 s); stopped on exit, whatever happens.

    `tls`: HTTPS with that certificate (its CA must be trusted by the client: see `trust_env`). `basic_auth`:
    (user, password) required on every request, else 401 with `WWW-Authenticate: Basic`. `directory` keeps the
    server's log and request log (default: a temporary folder, removed on exit).
    """
    args = [str(root)]
    if tls:
        args += ["--tls", str(tls.cert), str(tls.key)]
    if basic_auth:
        args += ["--basic-auth", *basic_auth]
    with ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="http-file-server-")))
        process = _start("tests.http_launcher", args, directory, "http")
        stack.callback(process.stop)
        scheme = "https" if tls else "http"
        yield HttpFileServer(process, f"{scheme}://127.0.0.1:{process.port}", root, basic_auth)
