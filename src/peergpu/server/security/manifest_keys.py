"""The server's Ed25519 key for signing job manifests.

Every replica must sign with the same key, so production deployments set
``PEERGPU_MANIFEST_SIGNING_KEY`` (base64 of the 32-byte private key; make one with
``peergpu admin signing-key``). Without it, a key is generated once into the data dir (0600),
which suits one server or several sharing a data dir.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from peergpu.config import ServerSettings


def generate_encoded_key() -> str:
    return encode_private_key(Ed25519PrivateKey.generate())


def encode_private_key(key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def decode_private_key(text: str) -> Ed25519PrivateKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PrivateKey.from_private_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            "PEERGPU_MANIFEST_SIGNING_KEY must be base64 of a 32-byte Ed25519 private key"
        ) from exc


def load_signing_key(settings: ServerSettings) -> Ed25519PrivateKey:
    configured = settings.manifest_signing_key.get_secret_value()
    if configured:
        return decode_private_key(configured)
    path = settings.data_dir / "manifest_signing_key"
    if path.exists():
        return decode_private_key(path.read_text())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    encoded = generate_encoded_key()
    path.touch(mode=0o600)
    path.write_text(encoded)
    return decode_private_key(encoded)
