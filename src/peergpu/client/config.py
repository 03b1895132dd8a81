"""Where ``peergpu login`` keeps the server URL and credentials, and how the CLI picks them.

The folder is ``$PEERGPU_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/peergpu``, else
``~/.config/peergpu``; the file is ``credentials.json``, written atomically with mode 0600 in a
folder created with mode 0700. ``PEERGPU_SERVER`` and ``PEERGPU_API_KEY`` override the file.

Stored tokens or keys are only ever sent to the server they were issued by: when the server is
overridden (flag or ``PEERGPU_SERVER``) to another address, the stored credentials are not used.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows without WSL: no cross-process lock
    fcntl = None  # type: ignore[assignment]

from peergpu.client.http import normalize_server_url

CREDENTIALS_FILE = "credentials.json"
DEFAULT_SERVER = "http://127.0.0.1:8000"


class ConfigError(RuntimeError):
    """The credentials file exists but cannot be read; the message says which file."""


@dataclass(frozen=True, slots=True)
class StoredCredentials:
    server_url: str
    email: str | None = None
    user_id: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None
    api_key: str | None = None

    def with_tokens(self, access_token: str, refresh_token: str) -> StoredCredentials:
        return replace(self, access_token=access_token, refresh_token=refresh_token)


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """What a command should use: the server, the credential, and where it came from."""

    server_url: str
    api_key: str | None
    access_token: str | None
    refresh_token: str | None
    stored: StoredCredentials | None
    path: Path

    @property
    def has_credentials(self) -> bool:
        return bool(self.api_key or self.access_token or self.refresh_token)

    @property
    def uses_stored_tokens(self) -> bool:
        return self.api_key is None and self.has_credentials


class CredentialsFile:
    """The credentials file as the SDK's :class:`~peergpu.client.http.TokenStore`: rotated
    tokens are saved as they change, and refreshes are serialised across processes by an
    exclusive lock on ``credentials.lock`` next to it, so parallel ``peergpu`` commands never
    present one refresh token twice (which the server would punish by ending the login)."""

    def __init__(self, path: Path, stored: StoredCredentials) -> None:
        self.path = path
        self.stored = stored

    @contextmanager
    def lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def load(self) -> tuple[str | None, str | None] | None:
        try:
            current = load_credentials(self.path)
        except ConfigError:
            return None
        if current is None or not _same(current.server_url, self.stored.server_url):
            return None
        return current.access_token, current.refresh_token

    def save(self, access_token: str, refresh_token: str) -> None:
        self.stored = self.stored.with_tokens(access_token, refresh_token)
        save_credentials(self.stored, self.path)


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("PEERGPU_CONFIG_DIR"):
        return Path(env["PEERGPU_CONFIG_DIR"]).expanduser()
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]).expanduser() / "peergpu"
    return Path.home() / ".config" / "peergpu"


def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / CREDENTIALS_FILE


def load_credentials(path: Path | None = None) -> StoredCredentials | None:
    """The stored credentials, or ``None`` when nobody is logged in."""
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; run `peergpu logout` to reset it") from exc
    known = {f.name for f in fields(StoredCredentials)}
    if not isinstance(data, dict) or not isinstance(data.get("server_url"), str):
        raise ConfigError(f"{path} is not a PeerGPU credentials file; run `peergpu logout`")
    return StoredCredentials(**{k: v for k, v in data.items() if k in known})


def save_credentials(credentials: StoredCredentials, path: Path | None = None) -> Path:
    """Write atomically (a temporary file renamed over the old one), readable by the owner
    only."""
    path = path or credentials_path()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    data = {k: v for k, v in asdict(credentials).items() if v is not None}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:  # mkstemp creates the file with mode 0600
            json.dump(data, handle, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def delete_credentials(path: Path | None = None) -> bool:
    """Forget the stored credentials; ``False`` if there were none."""
    path = path or credentials_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def resolve(
    *,
    server: str | None = None,
    api_key: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ResolvedConfig:
    """Pick the server and credential: flags, then ``PEERGPU_SERVER``/``PEERGPU_API_KEY``,
    then the credentials file, then the default server (``http://127.0.0.1:8000``)."""
    env = os.environ if env is None else env
    path = credentials_path(env)
    stored = load_credentials(path)
    server_url = choose_server(server, env=env, stored=stored)
    key = api_key or env.get("PEERGPU_API_KEY") or None
    same_server = stored is not None and _same(stored.server_url, server_url)
    if key is None and stored is not None and same_server:
        return ResolvedConfig(
            server_url=server_url,
            api_key=stored.api_key,
            access_token=None if stored.api_key else stored.access_token,
            refresh_token=None if stored.api_key else stored.refresh_token,
            stored=stored,
            path=path,
        )
    return ResolvedConfig(
        server_url=server_url,
        api_key=key,
        access_token=None,
        refresh_token=None,
        stored=stored if same_server else None,
        path=path,
    )


def choose_server(
    server: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stored: StoredCredentials | None = None,
) -> str:
    """The flag, else ``PEERGPU_SERVER``, else the stored server, else the default; normalised
    (``ValueError`` for a URL that is not http(s))."""
    env = os.environ if env is None else env
    chosen = server or env.get("PEERGPU_SERVER") or (stored.server_url if stored else None)
    return normalize_server_url(chosen or DEFAULT_SERVER)


def _same(stored_url: str, server_url: str) -> bool:
    try:
        return normalize_server_url(stored_url) == normalize_server_url(server_url)
    except ValueError:
        return False
