"""``peergpu admin``: operator commands that act on the database directly."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from pydantic import EmailStr, TypeAdapter, ValidationError

from peergpu.cli.common import console, fail, load_settings
from peergpu.errors import PeerGPUError
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate
from peergpu.server.db.models import UserRole
from peergpu.server.services import accounts

app = typer.Typer(
    help="Operator commands (run where the server's settings are).", no_args_is_help=True
)


@app.command("create-user")
def create_user(
    email: Annotated[str, typer.Option(help="The user's e-mail.")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="At least 10 characters; prompted if omitted.",
        ),
    ],
    role: Annotated[
        list[UserRole], typer.Option(help="Repeat for several roles: renter, host, admin.")
    ] = [UserRole.renter],  # noqa: B006 - Typer needs a literal default
    name: Annotated[str, typer.Option(help="Display name.")] = "",
) -> None:
    """Create a user with any roles, including admin."""
    try:
        email = TypeAdapter(EmailStr).validate_python(email)
    except ValidationError:
        fail(f"not a valid e-mail address: {email!r}")
    if len(password) < 10:
        fail("the password needs at least 10 characters")
    settings = load_settings()

    async def run() -> str:
        context = ServerContext.build(settings)
        try:
            await migrate.upgrade(context.engine)
            async with context.sessionmaker() as session:
                user = await accounts.create_user(
                    session=session,
                    passwords=context.passwords,
                    email=email,
                    password=password,
                    roles=list(role),
                    display_name=name,
                )
                return str(user.id)
        finally:
            await context.close()

    try:
        user_id = asyncio.run(run())
    except PeerGPUError as exc:
        fail(exc.message)
    console.print(f"created user {email} ({', '.join(r.value for r in role)}) id={user_id}")
