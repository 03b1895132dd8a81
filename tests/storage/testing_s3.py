"""A real S3-compatible server for the tests: moto's S3 on loopback, in a subprocess, behind a
thin WSGI layer (``StrictS3``) that checks what AWS checks and moto does not.

moto 5 stores what it is sent. It verifies neither the signature nor the expiry of a
pre-signed URL, nor ``x-amz-checksum-sha256`` or ``Content-MD5`` against the body; AWS does,
and ``S3ObjectStore`` relies on it (docs/storage.md). So before moto sees a request,
``StrictS3`` checks, answering with S3's own status codes and error codes:

* a pre-signed request (``X-Amz-Signature`` in the query): the access key is ours, the URL has
  not expired (403 ``AccessDenied``), and the SigV4 signature, recomputed by botocore's own
  signer from the method, path, query and the signed headers *as sent*, matches (403
  ``SignatureDoesNotMatch``: a changed or missing signed header, such as ``Content-Length``
  or ``x-amz-checksum-sha256``, fails here, as on S3);
* a ``PUT`` carrying ``x-amz-checksum-sha256`` or ``Content-MD5``: the body matches it (400
  ``BadDigest``).

And where a client sends ``x-amz-checksum-sha256`` it adds ``x-amz-sdk-checksum-algorithm``,
because moto records a checksum (returned by ``HeadObject`` with checksum mode) only with that
SDK header, while S3 records it either way.

It runs as its own process (``python -m tests.storage.testing_s3``) so that the memory moto
holds is not counted by the tests that measure ours, and so that one server serves the whole
session. ``S3Server`` starts it, empties it between tests (``reset``) and can move its clock.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl
from urllib.request import Request, urlopen

import boto3
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

if TYPE_CHECKING:  # the server process does not need the store
    from peergpu.server.storage.s3 import S3ObjectStore

ACCESS_KEY = "peergpu-test-access-key"
SECRET_KEY = "peergpu-test-secret-key"
REGION = "us-east-1"
#: POST a number of seconds here to move the server's clock (for expiry tests); 0 resets it.
CLOCK_PATH = "/__peergpu_test__/clock-offset"
REPO_ROOT = Path(__file__).resolve().parents[2]

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class S3Server:
    """The server process; ``url`` is its endpoint once ``start`` returns."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def start(self) -> S3Server:
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.storage.testing_s3"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # the port, once it listens (EOF if it died)
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the S3 test server did not start; see {self.log_path}")
        self.url = f"http://127.0.0.1:{int(line)}"
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)
        if self._client is not None:
            self._client.close()

    @property
    def client(self) -> Any:
        """A plain boto3 client, to look at the bucket behind a store's back."""
        if self._client is None:
            self._client = boto3.client(
                "s3",
                endpoint_url=self.url,
                region_name=REGION,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                config=Config(s3={"addressing_style": "path"}),
            )
        return self._client

    def store(self, bucket: str, **options: Any) -> S3ObjectStore:
        from peergpu.server.storage.s3 import S3ObjectStore

        return S3ObjectStore(
            bucket,
            region=REGION,
            endpoint_url=self.url,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            addressing_style="path",
            **options,
        )

    def settings_env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """``PEERGPU_S3_*`` variables that point a server at ``bucket`` here."""
        return {
            "PEERGPU_S3_BUCKET": bucket,
            "PEERGPU_S3_ENDPOINT_URL": self.url,
            "PEERGPU_S3_REGION": REGION,
            "PEERGPU_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "PEERGPU_S3_SECRET_ACCESS_KEY": SECRET_KEY,
            "PEERGPU_S3_PREFIX": prefix,
            "PEERGPU_S3_ADDRESSING_STYLE": "path",
        }

    def reset(self) -> None:
        """Forget every bucket and object, and put the clock back."""
        self._post("/moto-api/reset", b"")
        self.set_clock_offset(0)

    def set_clock_offset(self, seconds: float) -> None:
        self._post(CLOCK_PATH, str(seconds).encode())

    def _post(self, path: str, body: bytes) -> None:
        with urlopen(Request(f"{self.url}{path}", data=body, method="POST"), timeout=10):
            pass  # urlopen raises on an error status

    def objects(self, bucket: str) -> list[str]:
        """Every key in the bucket, and every multipart upload still open (``upload:<key>``)."""
        listed = self.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        uploads = self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return sorted(
            [str(entry["Key"]) for entry in listed]
            + [f"upload:{entry['Key']}" for entry in uploads]
        )


class StrictS3:
    """WSGI middleware in front of moto; see the module docstring for what it checks."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.clock_offset = 0.0

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == CLOCK_PATH:
            self.clock_offset = float(_read_body(environ) or b"0")
            start_response("204 No Content", [])
            return [b""]
        method = environ["REQUEST_METHOD"]
        query = environ.get("QUERY_STRING", "")
        presigned = "X-Amz-Signature=" in query
        has_digest = method == "PUT" and (
            "HTTP_X_AMZ_CHECKSUM_SHA256" in environ or "HTTP_CONTENT_MD5" in environ
        )
        if presigned or has_digest:
            body = _read_body(environ)
            environ["wsgi.input"] = io.BytesIO(body)
            refusal = (self._check_signature(environ, query) if presigned else None) or (
                _check_digests(environ, body) if has_digest else None
            )
            if refusal is not None:
                status, code, message = refusal
                return _error(start_response, status, code, message)
        if method == "PUT" and "HTTP_X_AMZ_CHECKSUM_SHA256" in environ:
            environ.setdefault("HTTP_X_AMZ_SDK_CHECKSUM_ALGORITHM", "SHA256")
        return self.app(environ, start_response)

    def _check_signature(self, environ: dict[str, Any], query: str) -> tuple[int, str, str] | None:
        params = dict(parse_qsl(query, keep_blank_values=True))
        try:
            access_key, _day, region, service, _ = params["X-Amz-Credential"].split("/")
            amz_date = params["X-Amz-Date"]
            expires = int(params["X-Amz-Expires"])
            signed_headers = params["X-Amz-SignedHeaders"].split(";")
            signature = params["X-Amz-Signature"]
            signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except (KeyError, ValueError):
            return 400, "AuthorizationQueryParametersError", "Malformed pre-signed URL."
        if access_key != ACCESS_KEY:
            return 403, "InvalidAccessKeyId", "The AWS Access Key Id does not exist."
        if expires > 7 * 24 * 3600:
            return 400, "AuthorizationQueryParametersError", "X-Amz-Expires is too large."
        if time.time() + self.clock_offset > signed_at.timestamp() + expires:
            return 403, "AccessDenied", "Request has expired"
        headers = {}
        for name in signed_headers:
            value = _header(environ, name)
            if value is None:
                return 403, "SignatureDoesNotMatch", f"The signed header {name} is missing."
            headers[name] = value
        raw_path = str(environ.get("RAW_URI") or environ["PATH_INFO"]).split("?", 1)[0]
        unsigned = "&".join(p for p in query.split("&") if not p.startswith("X-Amz-Signature="))
        request = AWSRequest(
            method=environ["REQUEST_METHOD"],
            url=f"http://{headers.get('host', '')}{raw_path}?{unsigned}",
            headers=headers,
        )
        request.context["timestamp"] = amz_date
        auth = S3SigV4QueryAuth(Credentials(ACCESS_KEY, SECRET_KEY), service, region, expires)
        expected = auth.signature(
            auth.string_to_sign(request, auth.canonical_request(request)), request
        )
        if not hmac.compare_digest(expected, signature):
            return 403, "SignatureDoesNotMatch", "The request signature does not match."
        return None


def _check_digests(environ: dict[str, Any], body: bytes) -> tuple[int, str, str] | None:
    sha256 = environ.get("HTTP_X_AMZ_CHECKSUM_SHA256")
    if sha256 is not None and sha256 != base64.b64encode(hashlib.sha256(body).digest()).decode():
        return 400, "BadDigest", "The SHA256 you specified did not match the calculated checksum."
    md5 = environ.get("HTTP_CONTENT_MD5")
    if md5 is not None and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
        return 400, "BadDigest", "The Content-MD5 you specified did not match what we received."
    return None


def _header(environ: dict[str, Any], name: str) -> str | None:
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}")
    return None if value is None else str(value)


def _read_body(environ: dict[str, Any]) -> bytes:
    stream: IO[bytes] = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit():
        return stream.read(int(length))
    return stream.read() if environ.get("wsgi.input_terminated") else b""


def _error(start_response: StartResponse, status: int, code: str, message: str) -> list[bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    reason = {400: "Bad Request", 403: "Forbidden"}[status]
    start_response(
        f"{status} {reason}",
        [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
    )
    return [body]


def main() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = StrictS3(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        "127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler
    )
    sys.stdout.write(f"{server.server_port}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
