"""The `spice` Typer app: options in, one call into the module that does the work, exit code out.

Errors the user can act on (`CliError`) become one red line on stderr and exit 1; usage errors are
Typer's own (exit 2), printed plainly rather than in Rich boxes so that they stay greppable lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from spice_cli import CliError

if TYPE_CHECKING:
    from spice_cli.status import HttpSettings

app = typer.Typer(name="spice", help="Spice.ai CLI: run the runtime, query it over Flight SQL, manage dev TLS.",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
tls_app = typer.Typer(help="A development PKI: a CA plus server and client certificates (ECDSA P-256).",
                      no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tls_app, name="tls")
cluster_app = typer.Typer(help="Cluster operations for Spice runtime", no_args_is_help=True, rich_markup_mode=None)
cluster_tls_app = typer.Typer(help="TLS certificate operations for clustered mode", no_args_is_help=True,
                              rich_markup_mode=None)
cluster_app.add_typer(cluster_tls_app, name="tls")
app.add_typer(cluster_app, name="cluster")


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except CliError as e:
        typer.secho(str(e), err=True, fg="red")
        raise typer.Exit(1) from None


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


RootCert = Annotated[Path | None, typer.Option("--tls-root-certificate-file", metavar="CA.PEM",
                                                  help="Trust this CA; the default endpoint switches to TLS.")]
ClientCert = Annotated[Path | None, typer.Option("--client-tls-certificate-file", metavar="CERT.PEM",
                                                    help="Client certificate for mTLS (needs the key).")]
ClientKey = Annotated[Path | None, typer.Option("--client-tls-key-file", metavar="KEY.PEM",
                                                   help="Client private key for mTLS (needs the certificate).")]
ApiKey = Annotated[str | None, typer.Option("--api-key", help="API key for the runtime.")]


def _client_pair(cert: Path | None, key: Path | None) -> None:
    if cert and not key:
        raise typer.BadParameter("--client-tls-key-file is required with --client-tls-certificate-file")
    if key and not cert:
        raise typer.BadParameter("--client-tls-certificate-file is required with --client-tls-key-file")


@app.callback()
def _root(ctx: typer.Context,
          verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                               help="Pass -v (or -vv) to the runtime.")] = 0,
          very_verbose: Annotated[bool, typer.Option("--very-verbose", help="Pass -vv to the runtime.")] = False,
          ) -> None:
    ctx.obj = 2 if very_verbose else verbose


@app.command()
def run(ctx: typer.Context,
        args: Annotated[list[str] | None, typer.Argument(metavar="[-- SPICED FLAGS]",
                                                            help="Passed to spiced unchanged.")] = None) -> None:
    """Start the Spice runtime (spiced) of this installation; arguments after `--` go to it unchanged."""
    from spice_cli import run as runner

    with _one_line_errors():
        _exit(runner.run(args or [], ctx.obj or 0))


@app.command()
def sql(endpoint: Annotated[str | None, typer.Option(
            "--endpoint", "--flight-endpoint", metavar="URL",
            help="grpc://, grpc+tls://, http:// or https:// (default http://localhost:50051).")] = None,
        tls_root_certificate_file: RootCert = None,
        client_tls_certificate_file: ClientCert = None,
        client_tls_key_file: ClientKey = None,
        api_key: ApiKey = None,
        cache_control: Annotated[Literal["cache", "no-cache"] | None, typer.Option(
            "--cache-control",
            help="no-cache asks the runtime to bypass its results cache.")] = None,
        user_agent: Annotated[str | None, typer.Option("--user-agent", help="User-Agent to send.")] = None,
        headers: Annotated[list[str] | None, typer.Option("--headers", metavar="KEY:VALUE",
                                                             help="Extra request metadata (repeatable).")] = None,
        query: Annotated[str | None, typer.Option("--query", help="Run one statement and exit.")] = None,
        ) -> None:
    """Start an interactive SQL REPL (Arrow Flight SQL); reads statements from stdin when piped."""
    from spice_cli import flight_client, repl

    _client_pair(client_tls_certificate_file, client_tls_key_file)
    pairs: list[tuple[str, str]] = []
    for header in headers or []:
        key, sep, value = header.partition(":")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY:VALUE, got '{header}'", param_hint="'--headers'")
        pairs.append((key.strip(), value.strip()))
    settings = flight_client.FlightSettings(
        endpoint=endpoint or flight_client.default_endpoint(tls_root_certificate_file),
        tls_root_certificate_file=tls_root_certificate_file,
        client_certificate_file=client_tls_certificate_file, client_key_file=client_tls_key_file,
        api_key=api_key, cache_control=cache_control,
        user_agent=user_agent, headers=tuple(pairs))
    with _one_line_errors():
        _exit(repl.run(settings, query))


def _http(http_endpoint: str | None, root: Path | None, cert: Path | None, key: Path | None,
          api_key: str | None) -> HttpSettings:
    from spice_cli.status import HttpSettings

    _client_pair(cert, key)
    return HttpSettings(http_endpoint, root, cert, key, api_key)


HttpEndpoint = Annotated[str | None, typer.Option(
    "--http-endpoint", metavar="URL", help="Runtime HTTP API (default http://127.0.0.1:8090, https with a root CA).")]


@app.command()
def status(http_endpoint: HttpEndpoint = None, tls_root_certificate_file: RootCert = None,
           client_tls_certificate_file: ClientCert = None, client_tls_key_file: ClientKey = None,
           api_key: ApiKey = None) -> None:
    """Show the runtime's endpoints and their status."""
    from spice_cli import status as st

    settings = _http(http_endpoint, tls_root_certificate_file, client_tls_certificate_file, client_tls_key_file,
                     api_key)
    with _one_line_errors():
        typer.echo(st.status_table(settings))


@app.command()
def datasets(http_endpoint: HttpEndpoint = None, tls_root_certificate_file: RootCert = None,
             client_tls_certificate_file: ClientCert = None, client_tls_key_file: ClientKey = None,
             api_key: ApiKey = None) -> None:
    """List the runtime's datasets and their status."""
    from spice_cli import status as st

    settings = _http(http_endpoint, tls_root_certificate_file, client_tls_certificate_file, client_tls_key_file,
                     api_key)
    with _one_line_errors():
        typer.echo(st.datasets_table(settings))


@app.command()
def refresh(dataset: Annotated[str, typer.Argument(metavar="DATASET", help="The accelerated dataset to refresh.")],
            refresh_sql: Annotated[str | None, typer.Option(
                "--refresh-sql", metavar="SQL",
                help="SELECT … FROM <dataset> WHERE … for this refresh only.")] = None,
            refresh_mode: Annotated[Literal["full", "append"] | None, typer.Option(
                "--refresh-mode", help="Refresh mode for this refresh only: full or append.")] = None,
            http_endpoint: HttpEndpoint = None, tls_root_certificate_file: RootCert = None,
            client_tls_certificate_file: ClientCert = None, client_tls_key_file: ClientKey = None,
            api_key: ApiKey = None) -> None:
    """Refresh an accelerated dataset now."""
    from spice_cli import refresh as refresher

    settings = _http(http_endpoint, tls_root_certificate_file, client_tls_certificate_file, client_tls_key_file,
                     api_key)
    with _one_line_errors():
        refresher.refresh(settings, dataset, refresh_sql, refresh_mode)


@app.command()
def version() -> None:
    """Show the CLI and runtime versions."""
    from spice_cli import status as st

    typer.echo(st.version_text())


@app.command()
def init(name: Annotated[str | None, typer.Argument(help="Spicepod name; creates ./NAME/spicepod.yaml.")] = None
         ) -> None:
    """Write a minimal spicepod.yaml."""
    from spice_cli import init as initializer

    with _one_line_errors():
        path = initializer.init(name)
    typer.echo(f"{path} initialized!")


TlsDir = Annotated[Path, typer.Option("--dir", metavar="DIR", help="Directory holding ca.crt and ca.key.")]
Days = Annotated[int | None, typer.Option("--days", help="Validity in days.")]
Force = Annotated[bool, typer.Option("--force", help="Replace existing files.")]


@tls_app.command("init")
def tls_init(directory: TlsDir = Path("."), days: Days = None, force: Force = False) -> None:
    """Create a development CA: DIR/ca.crt and DIR/ca.key."""
    from spice_cli import pki

    with _one_line_errors():
        issued = pki.init_ca(directory, days=pki.CA_DAYS if days is None else days, force=force)
    typer.echo(f"Created CA certificate {issued.cert} and key {issued.key}")


@tls_app.command("add")
def tls_add(name: Annotated[str, typer.Argument(help="File name stem: NAME.crt and NAME.key.")],
            host: Annotated[list[str] | None, typer.Option(
                "--host", help="DNS name or IP for the SAN (repeatable; servers "
                               "default to localhost and 127.0.0.1, clients to NAME).")] = None,
            client: Annotated[bool, typer.Option("--client", help="Issue a client certificate (clientAuth).")] = False,
            days: Days = None, directory: TlsDir = Path("."), force: Force = False) -> None:
    """Issue a server (or, with --client, a client) certificate signed by the CA in DIR."""
    from spice_cli import pki

    with _one_line_errors():
        issued = pki.add(directory, name, hosts=host or (), client=client,
                         days=pki.LEAF_DAYS if days is None else days, force=force)
    kind = "client" if client else "server"
    typer.echo(f"Issued {kind} certificate {issued.cert} and key {issued.key}")


def _confirm_overwrite(what: str) -> bool:
    typer.echo(f"{what} already exists. Overwrite (y/n)? ", nl=False)
    return sys.stdin.readline().strip().lower() == "y"


@cluster_tls_app.command("init")
def cluster_tls_init() -> None:
    """Initialize a test PKI infrastructure for clustered mode: ~/.spice/pki/ca.crt and ca.key (ECDSA P-256,
    valid 10 years). For development and testing only."""
    from spice_cli import cluster_pki

    with _one_line_errors():
        created = cluster_pki.init(_confirm_overwrite)
    if created is None:
        typer.echo("Aborted.")
        return
    typer.echo()
    typer.secho("Test PKI infrastructure initialized successfully!", fg="green")
    typer.echo()
    typer.echo(f"CA Certificate: {created.issued.cert}")
    typer.echo(f"CA Private Key: {created.issued.key}")
    typer.echo(f"Validity:       {cluster_pki.CA_VALIDITY_YEARS} years (until {created.not_after})")
    typer.echo(f"OU:             {created.ou}")
    typer.echo()
    typer.secho("WARNING: This CA is for development and testing only.", fg="yellow")
    typer.secho("         DO NOT use these certificates in production!", fg="yellow")
    typer.echo()
    typer.echo("Next steps:")
    typer.echo(f"  Run {typer.style('spice cluster tls add <client-name>', fg='cyan')} to create a certificate "
               "for a cluster member.")


@cluster_tls_app.command("add")
def cluster_tls_add(client_name: Annotated[str, typer.Argument(metavar="CLIENT_NAME",
                                                                help="Name of the client/node")],
                    host: Annotated[str | None, typer.Option(
                        "--host", help="Additional host to include in Subject Alternative Names")] = None) -> None:
    """Create a new node certificate signed by the CA: ~/.spice/pki/<name>.crt and .key (ECDSA P-256, valid
    1 year, clientAuth and serverAuth, SANs localhost, 127.0.0.1 and --host)."""
    from spice_cli import cluster_pki

    with _one_line_errors():
        created = cluster_pki.add(client_name, host, _confirm_overwrite)
    if created is None:
        typer.echo("Aborted.")
        return
    typer.echo()
    typer.secho(f"Certificate for '{client_name}' created successfully!", fg="green")
    typer.echo()
    typer.echo(f"Certificate: {created.issued.cert}")
    typer.echo(f"Private Key: {created.issued.key}")
    typer.echo(f"Validity:    {cluster_pki.CLIENT_VALIDITY_YEARS} year (until {created.not_after})")
    typer.echo(f"CN:          {client_name}")
    typer.echo(f"DNS SANs:    {', '.join(created.dns)}")
    typer.echo(f"IP SANs:     {', '.join(created.ips)}")


def main() -> int:
    try:
        app(prog_name="spice")
    except CliError as e:
        typer.secho(str(e), err=True, fg="red")
        return 1
    except Exception as e:  # noqa: BLE001  # the CLI promises one line, never a traceback
        typer.secho(f"Error: {type(e).__name__}: {e}", err=True, fg="red")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
