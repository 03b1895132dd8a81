"""Outgoing e-mail: the console log until SMTP is configured, then aiosmtplib."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from email.message import EmailMessage

import aiosmtplib

from peergpu.config import ServerSettings

logger = logging.getLogger(__name__)


class Mailer(ABC):
    @abstractmethod
    async def send(self, *, to: str, subject: str, body: str) -> bool:
        """Send one plain-text message; return False (and log) on failure, never raise."""


class ConsoleMailer(Mailer):
    """Writes every message to the log, so a developer can follow invite links locally."""

    async def send(self, *, to: str, subject: str, body: str) -> bool:
        logger.warning("e-mail (SMTP not configured) to=%s subject=%r\n%s", to, subject, body)
        return True


class SmtpMailer(Mailer):
    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings

    async def send(self, *, to: str, subject: str, body: str) -> bool:
        settings = self._settings
        message = EmailMessage()
        message["From"] = settings.smtp_from
        message["To"] = to
        message["Subject"] = subject
        message.set_content(body)
        try:
            await aiosmtplib.send(
                message,
                hostname=settings.smtp_host,
                port=settings.smtp_port,
                username=settings.smtp_username or None,
                password=settings.smtp_password.get_secret_value() or None,
                start_tls=settings.smtp_starttls,
                timeout=15,
            )
        except (aiosmtplib.SMTPException, OSError):
            logger.exception("could not send e-mail to %s", to)
            return False
        return True


def create_mailer(settings: ServerSettings) -> Mailer:
    return SmtpMailer(settings) if settings.smtp_host else ConsoleMailer()
