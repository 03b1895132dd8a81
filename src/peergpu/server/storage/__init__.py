"""Object storage (bundles, artifacts, log chunks, model files) behind one interface.

``ObjectStore`` (``base.py``) is the contract, with two implementations:

* ``LocalObjectStore`` (``local.py``) keeps objects in a folder and hands out URLs that this
  server serves itself (``peergpu.server.api.storage``), signed with ``signing.UrlSigner``;
* ``S3ObjectStore`` (``s3.py``) keeps them in an S3 bucket (AWS or any S3-compatible service);
  its ``presign_*`` return S3's own pre-signed URLs, so the server never sees those bytes.

``create_object_store`` picks one from the settings (see docs/storage.md).
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
    """The store the settings ask for. Creating it does no I/O.

    With ``s3_bucket`` set: an ``S3ObjectStore`` on that bucket, configured by the other
    ``s3_*`` settings (an empty access key means boto3's default credential chain); its
    client is made on first use, and ``S3ObjectStore.ensure_bucket`` checks the bucket.

    Otherwise: the local store under ``data_dir/objects``, its URLs rooted at the server's
    public URL and signed with ``secret``; pass
    ``derive_storage_secret(settings.resolved_secret_key())`` so that every replica (and every
    restart) accepts the URLs the others issued. The folder is made on the first upload.
    """
    if settings.s3_bucket:
        # Imported here: botocore adds half a second to every process that imports the server.
        from peergpu.server.storage.s3 import S3ObjectStore

        return S3ObjectStore(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            region=settings.s3_region,
            endpoint_url=settings.s3_endpoint_url or None,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
            addressing_style=settings.s3_addressing_style,
        )
    return LocalObjectStore(
        settings.data_dir / "objects",
        public_url=settings.effective_public_url + LOCAL_STORE_URL_PATH,
        secret=secret,
    )
