"""Object storage (bundles, artifacts, log chunks, model files) behind one interface.

``ObjectStore`` (``base.py``) is the contract; ``LocalObjectStore`` keeps objects in a folder
and hands out URLs that this server serves itself (``peergpu.server.api.storage``), signed
with ``signing.UrlSigner``. An S3 implementation will fit the same interface: its
``presign_*`` return S3's own pre-signed URLs and the server never sees the bytes.
"""

from __future__ import annotations

from peergpu.config import ServerSettings
from peergpu.server.storage.base import (
    ObjectInfo,
    ObjectStore,
    ObjectStream,
    validate_key,
    validate_prefix,
)
from peergpu.server.storage.local import LocalObjectStore
from peergpu.server.storage.signing import UrlGrant, UrlSigner, derive_storage_secret

__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "ObjectStream",
    "UrlGrant",
    "UrlSigner",
    "create_object_store",
    "derive_storage_secret",
    "validate_key",
    "validate_prefix",
]

#: Where the server serves the local store's URLs, under ``effective_public_url``.
LOCAL_STORE_URL_PATH = "/api/v1"


def create_object_store(settings: ServerSettings, *, secret: bytes) -> ObjectStore:
    """The local store under ``data_dir/objects``, its URLs rooted at the server's public URL.

    ``secret`` signs the URLs; pass ``derive_storage_secret(settings.resolved_secret_key())``
    so that every replica (and every restart) accepts the URLs the others issued. Creating
    the store does no I/O; the folder is made on the first upload.
    """
    return LocalObjectStore(
        settings.data_dir / "objects",
        public_url=settings.effective_public_url + LOCAL_STORE_URL_PATH,
        secret=secret,
    )
