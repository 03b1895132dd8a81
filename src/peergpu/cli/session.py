"""``peergpu login | logout | whoami`` and :func:`connect`, which every client command uses to
build an SDK client from the stored credentials (persisting rotated tokens as they change)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from peergpu.cli.common import console, fail
from peergpu.cli.output import EXIT_AUTH, EXIT_USAGE, handle_errors, notice, print_json
from peergpu.client import PeerGPU, PeerGPUError
from peergpu.client import config as cfg

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Server URL \\[env PEERGPU_SERVER; default: the one you logged in to, else "
        f"{cfg.DEFAULT_SERVER}].",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def connect(*, server: str | None = None, require_auth: bool = True) -> PeerGPU:
    """An SDK client for the configured server and credentials. Without credentials and with
    ``require_auth``, exits with code 3 and a hint to log in."""
    with handle_errors():
        try:
            resolved = cfg.resolve(server=server)
        except ValueError as exc:
            fail(escape(str(exc)), code=EXIT_USAGE)
    if require_auth and not resolved.has_credentials:
        fail(
            f"not logged in to {resolved.server_url}; run `peergpu login` (or set PEERGPU_API_KEY)",
            code=EXIT_AUTH,
        )
    store = None
    if resolved.stored is not None and resolved.uses_stored_tokens:
        store = cfg.CredentialsFile(resolved.path, resolved.stored)
    return PeerGPU(
        resolved.server_url,
        api_key=resolved.api_key,
        access_token=resolved.access_token,
        refresh_token=resolved.refresh_token,
        token_store=store,
    )


def login(
    server: ServerOption = None,
    email: Annotated[
        str | None, typer.Option(help="Your account's e-mail (prompted if missing).")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin's first line.")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="Log in with an API key (pgk_...) instead of a password."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Log in and store the server URL and credentials (mode 0600) for the other commands."""
    server_url = _login_server(server)
    if api_key:
        client = PeerGPU(server_url, api_key=api_key)
    else:
        email = email or typer.prompt("E-mail")
        password = _read_password(password_stdin)
        client = PeerGPU(server_url)
        with handle_errors("login failed"):
            client.login(email, password)
    with handle_errors("login failed"), client:
        user = client.me()
    path = cfg.save_credentials(
        cfg.StoredCredentials(
            server_url=server_url,
            email=user.email,
            user_id=user.id,
            access_token=client.access_token,
            refresh_token=client.refresh_token,
            api_key=api_key or None,
        )
    )
    if as_json:
        print_json({"server": server_url, "user": user.to_json(), "credentials_file": str(path)})
        return
    console.print(f"logged in to {escape(server_url)} as [bold]{escape(user.email)}[/]")
    notice(f"credentials saved to {escape(str(path))}")


def logout(as_json: JsonOption = False) -> None:
    """End the stored login at the server and forget the stored credentials."""
    path = cfg.credentials_path()
    try:
        stored = cfg.load_credentials(path)
    except cfg.ConfigError:
        stored = None
    ended_at_server = False
    if stored is not None and stored.refresh_token and not stored.api_key:
        client = PeerGPU(stored.server_url, refresh_token=stored.refresh_token, retries=0)
        try:
            with client:
                client.logout()
            ended_at_server = True
        except (PeerGPUError, ConnectionError) as exc:
            notice(f"[yellow]could not end the session at the server:[/] {escape(str(exc))}")
    removed = cfg.delete_credentials(path)
    if as_json:
        print_json({"logged_out": removed, "session_ended": ended_at_server})
        return
    console.print("logged out" if removed else "not logged in")


def whoami(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show who the stored credentials (or PEERGPU_API_KEY) belong to."""
    client = connect(server=server)
    with handle_errors(), client:
        user = client.me()
    if as_json:
        print_json({"server": client.server_url, "user": user.to_json()})
        return
    roles = ", ".join(user.roles) or "no roles"
    console.print(
        f"[bold]{escape(user.email)}[/] ({escape(roles)}) on {escape(client.server_url)}"
        f"  id={user.id}"
    )


def _login_server(server: str | None) -> str:
    try:
        try:
            stored = cfg.load_credentials()
        except cfg.ConfigError:
            stored = None  # a damaged file is about to be replaced
        return cfg.choose_server(server, stored=stored)
    except ValueError as exc:
        fail(escape(str(exc)), code=EXIT_USAGE)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("--password-stdin: nothing on stdin", code=EXIT_USAGE)
        return password
    return str(typer.prompt("Password", hide_input=True))
