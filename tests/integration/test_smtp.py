"""Invite e-mails through a real SMTP server (aiosmtpd on loopback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from peergpu.config import ServerSettings
from peergpu.server.services.email import SmtpMailer, create_mailer


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, _Inbox]]:
    inbox = _Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


def _settings(tmp_path: Path, port: int) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path, smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=False
    )


async def test_mail_is_delivered_over_smtp(smtp_server: tuple[int, _Inbox], tmp_path: Path) -> None:
    port, inbox = smtp_server
    mailer = create_mailer(_settings(tmp_path, port))
    assert isinstance(mailer, SmtpMailer)
    assert await mailer.send(to="bob@example.com", subject="Hello", body="Accept: https://x/y")
    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert message["To"] == "bob@example.com"
    assert message["Subject"] == "Hello"
    assert "https://x/y" in message.get_payload()


async def test_unreachable_smtp_reports_failure_without_raising(tmp_path: Path) -> None:
    mailer = SmtpMailer(_settings(tmp_path, _free_port()))
    assert await mailer.send(to="bob@example.com", subject="x", body="y") is False
