"""Email over SMTP with aiosmtplib: plain, STARTTLS or TLS from the start, optional login.

channel = EmailChannel("email", EmailChannelConfig(smtp_server="127.0.0.1:2525", recipients=["ops@x"]))
The password comes from the environment variable named by password_env, read once at start.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import aiosmtplib

from iros.alerting.channels import from_env, subject, text_body
from iros.alerting.channels.base import ChannelError, Notification
from iros.config import EmailChannelConfig


class EmailChannel:
    type = "email"

    def __init__(self, name: str, config: EmailChannelConfig) -> None:
        self.name = name
        self.config = config
        host, _, port = config.smtp_server.rpartition(":")
        if not host or not port.isdigit():
            host, port = config.smtp_server, "465" if config.tls == "tls" else "25"
        self.host, self.port = host, int(port)
        self._password = from_env(config.password_env, f"channel {name}") if config.password_env else None

    def message(self, n: Notification) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.recipients)
        msg["Subject"] = f"{self.config.subject_prefix} {subject(n)}".strip()
        msg.set_content(text_body(n))
        return msg

    async def send(self, notification: Notification) -> None:
        c = self.config
        try:
            await aiosmtplib.send(
                self.message(notification),
                hostname=self.host,
                port=self.port,
                username=c.username,
                password=self._password,
                use_tls=c.tls == "tls",
                start_tls=c.tls == "starttls",
                validate_certs=c.validate_certs,
                timeout=c.timeout_seconds,
            )
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise ChannelError(f"SMTP login refused ({exc.code})", retryable=False) from None
        except aiosmtplib.SMTPRecipientsRefused:
            raise ChannelError("the SMTP server refused every recipient", retryable=False) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise ChannelError(
                f"SMTP error {exc.code}: {exc.message[:200]}", retryable=exc.code >= 400
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ChannelError(f"could not reach the SMTP server ({type(exc).__name__})") from None

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "smtp_server": c.smtp_server,
            "recipients": c.recipients,
            "tls": c.tls,
            "username": c.username,
            "password_env": c.password_env,
        }

    async def aclose(self) -> None:
        return None
