"""A small fake of the Stripe API, served over loopback HTTP, for the billing tests.

The real ``stripe`` SDK talks to it (``stripe_api_base`` points here), so the tests exercise the
SDK's form encoding, headers, retries and error parsing. It answers the endpoints PeerGPU uses
with the shapes of Stripe's API reference (``object`` fields, ``cus_``/``cs_``/``pi_``/``ch_``/
``acct_``/``tr_``/``dp_``/``evt_`` ids, Stripe's error body)::

    POST /v1/customers                 POST /v1/accounts
    POST /v1/checkout/sessions         GET  /v1/accounts/{id}
    GET  /v1/checkout/sessions/{id}    POST /v1/account_links
    POST /v1/payment_intents           POST /v1/transfers

Like Stripe it checks the API key, replays a POST whose ``Idempotency-Key`` it has seen (the
same answer, ``Idempotent-Replayed: true``), and refuses a key reused with other parameters.
Tests can make the next calls to a path fail with a Stripe error (:meth:`FakeStripe.fail_next`)
or drop the connection without an answer (:meth:`FakeStripe.drop_next`), play what happens on
Stripe's side (a customer pays, a refund, a dispute, a reversed transfer) and get signed webhook
events exactly as Stripe signs them (:meth:`FakeStripe.event`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "sk_test_peergpu_fake"
WEBHOOK_SECRET = "whsec_peergpu_fake_secret"
API_VERSION = "2026-10-28.endive"

StripeObject = dict[str, Any]


@dataclass
class Recorded:
    """One request as the fake received it (params decoded from Stripe's form encoding)."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class _Fault:
    drop: bool = False
    #: With ``drop``: carry the request out first, so only the answer is lost.
    processed: bool = False
    status: int = 400
    error: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    replayed: bool = False


class StripeApiError(Exception):
    """An error answer: the HTTP status and the ``error`` object of Stripe's error body."""

    def __init__(self, status: int, message: str, **fields: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = {"type": "invalid_request_error", "message": message, **fields}


def new_id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


class FakeStripe:
    """The fake server; ``with FakeStripe() as fake:`` runs it on a free loopback port."""

    def __init__(self, *, api_key: str = API_KEY, webhook_secret: str = WEBHOOK_SECRET) -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.requests: list[Recorded] = []
        self.objects: dict[str, StripeObject] = {}
        self._replies: dict[str, tuple[tuple[str, str, str], _Answer]] = {}
        self._faults: dict[str, list[_Fault]] = defaultdict(list)
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeStripe:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-stripe", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- what tests ask of it ---------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[Recorded]:
        """Requests received for ``path`` (exact, or a prefix ending in ``/``)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == method
                and (r.path == path or (path.endswith("/") and r.path.startswith(path)))
            ]

    def fail_next(self, path: str, *, status: int = 400, times: int = 1, **fields: str) -> None:
        """The next ``times`` requests to ``path`` get this Stripe error: by default a Transfer
        refused for lack of balance; ``fields`` (type, code, message, decline_code) change it."""
        error = {
            "type": "invalid_request_error",
            "code": "balance_insufficient",
            "message": "You have insufficient available funds in your Stripe account.",
            **fields,
        }
        error["doc_url"] = f"https://stripe.com/docs/error-codes/{error['code'].replace('_', '-')}"
        with self._lock:
            self._faults[path] += [_Fault(status=status, error=error) for _ in range(times)]

    def drop_next(self, path: str, *, times: int = 1, processed: bool = False) -> None:
        """The next ``times`` requests to ``path`` get no answer: the connection is closed.
        ``processed``: the first of them is carried out (and kept for its idempotency key)
        before its answer is lost, as when a network fails on the way back."""
        with self._lock:
            self._faults[path] += [
                _Fault(drop=True, processed=processed and i == 0) for i in range(times)
            ]

    def get(self, object_id: str) -> StripeObject:
        with self._lock:
            return copy.deepcopy(self.objects[object_id])

    def update(self, object_id: str, **fields: Any) -> StripeObject:
        with self._lock:
            self.objects[object_id].update(fields)
            return copy.deepcopy(self.objects[object_id])

    # --- what happens on Stripe's side ------------------------------------------------------

    def pay_checkout(self, session_id: str, *, amount_total: int | None = None) -> StripeObject:
        """The customer pays the session: it completes with a succeeded PaymentIntent (card
        saved for off-session use, as the session asked) and its Charge."""
        with self._lock:
            session = self.objects[session_id]
            amount = session["amount_total"] if amount_total is None else amount_total
            intent_data = session["_payment_intent_data"]
            intent = self._payment_intent(
                amount=amount,
                customer=session["customer"],
                payment_method=new_id("pm"),
                metadata=dict(intent_data.get("metadata", {})),
                setup_future_usage=intent_data.get("setup_future_usage"),
            )
            session.update(
                status="complete",
                payment_status="paid",
                payment_intent=intent["id"],
                amount_total=amount,
                amount_subtotal=amount,
            )
            return _public(session)

    def refund(self, charge_id: str, amount: int) -> StripeObject:
        """Refund ``amount`` cents more of a charge; the charge as ``charge.refunded`` shows it."""
        with self._lock:
            charge = self.objects[charge_id]
            charge["amount_refunded"] += amount
            charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
            return _public(charge)

    def dispute(self, charge_id: str) -> StripeObject:
        with self._lock:
            charge = self.objects[charge_id]
            charge["disputed"] = True
            return self._new(
                "dp",
                "dispute",
                amount=charge["amount"],
                charge=charge_id,
                currency="usd",
                payment_intent=charge["payment_intent"],
                reason="fraudulent",
                status="needs_response",
            )

    def close_dispute(self, dispute_id: str, status: str) -> StripeObject:
        return self.update(dispute_id, status=status)

    def reverse_transfer(self, transfer_id: str, amount: int) -> StripeObject:
        """Reverse ``amount`` cents more of a transfer; as ``transfer.reversed`` shows it."""
        with self._lock:
            transfer = self.objects[transfer_id]
            reversal = self._new(
                "trr", "transfer_reversal", amount=amount, currency="usd", transfer=transfer_id
            )
            transfer["amount_reversed"] += amount
            transfer["reversed"] = transfer["amount_reversed"] >= transfer["amount"]
            transfer["reversals"]["data"].insert(0, reversal)
            transfer["reversals"]["total_count"] += 1
            return _public(transfer)

    def charge_of(self, payment_intent_id: str) -> str:
        return str(self.get(payment_intent_id)["latest_charge"])

    # --- webhooks ---------------------------------------------------------------------------

    def sign(
        self, payload: bytes, *, timestamp: int | None = None, secret: str | None = None
    ) -> str:
        """``Stripe-Signature`` as Stripe computes it: HMAC-SHA256 of ``"<t>.<body>"``."""
        t = int(time.time()) if timestamp is None else timestamp
        key = (secret or self.webhook_secret).encode()
        mac = hmac.new(key, f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
        return f"t={t},v1={mac}"

    def event(
        self,
        type: str,
        obj: StripeObject,
        *,
        event_id: str | None = None,
        timestamp: int | None = None,
        secret: str | None = None,
        account: str | None = None,
    ) -> tuple[bytes, str]:
        """A webhook delivery: the event body and its ``Stripe-Signature`` header."""
        body: dict[str, Any] = {
            "id": event_id or new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": _public(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        if account:
            body["account"] = account
        payload = json.dumps(body).encode()
        return payload, self.sign(payload, timestamp=timestamp, secret=secret)

    # --- the API ----------------------------------------------------------------------------

    def _serve(self, method: str, path: str, params: dict[str, Any]) -> StripeObject:
        parts = path.strip("/").split("/")
        routes = {
            ("POST", "v1/customers"): self._create_customer,
            ("POST", "v1/checkout/sessions"): self._create_checkout_session,
            ("POST", "v1/payment_intents"): self._create_payment_intent,
            ("POST", "v1/accounts"): self._create_account,
            ("POST", "v1/account_links"): self._create_account_link,
            ("POST", "v1/transfers"): self._create_transfer,
        }
        route = routes.get((method, "/".join(parts)))
        if route is not None:
            return route(params)
        if method == "GET" and len(parts) >= 3 and "/".join(parts[:-1]) in _RETRIEVABLE:
            return _public(self._existing(parts[-1], "id"))
        raise StripeApiError(404, f"Unrecognized request URL ({method}: /{path.strip('/')}).")

    def _create_customer(self, params: dict[str, Any]) -> StripeObject:
        return self._new(
            "cus",
            "customer",
            email=params.get("email"),
            metadata=params.get("metadata", {}),
            name=params.get("name"),
        )

    def _create_checkout_session(self, params: dict[str, Any]) -> StripeObject:
        _require(params, "mode", "success_url", "line_items")
        if params.get("customer"):
            self._existing(params["customer"], "customer")
        items = params["line_items"]
        amount = sum(int(i["price_data"]["unit_amount"]) * int(i["quantity"]) for i in items)
        session_id = new_id("cs")
        return self._new(
            "cs",
            "checkout.session",
            id=session_id,
            amount_subtotal=amount,
            amount_total=amount,
            cancel_url=params.get("cancel_url"),
            client_reference_id=params.get("client_reference_id"),
            currency=items[0]["price_data"]["currency"],
            customer=params.get("customer"),
            expires_at=int(time.time()) + 24 * 3600,
            metadata=params.get("metadata", {}),
            mode=params["mode"],
            payment_intent=None,
            payment_status="unpaid",
            status="open",
            success_url=params["success_url"],
            url=f"https://checkout.stripe.com/c/pay/{session_id}",
            _payment_intent_data=params.get("payment_intent_data", {}),
        )

    def _create_payment_intent(self, params: dict[str, Any]) -> StripeObject:
        _require(params, "amount", "currency")
        if params.get("customer"):
            self._existing(params["customer"], "customer")
        return self._payment_intent(
            amount=int(params["amount"]),
            customer=params.get("customer"),
            payment_method=params.get("payment_method"),
            metadata=params.get("metadata", {}),
            setup_future_usage=params.get("setup_future_usage"),
            confirm=params.get("confirm") == "true",
        )

    def _payment_intent(
        self,
        *,
        amount: int,
        customer: str | None,
        payment_method: str | None,
        metadata: dict[str, Any],
        setup_future_usage: str | None,
        confirm: bool = True,
    ) -> StripeObject:
        """A PaymentIntent; confirmed with a payment method, it succeeds with its Charge."""
        intent_id = new_id("pi")
        succeeded = confirm and payment_method is not None
        charge = None
        if succeeded:
            charge = self._new(
                "ch",
                "charge",
                amount=amount,
                amount_refunded=0,
                currency="usd",
                customer=customer,
                disputed=False,
                paid=True,
                payment_intent=intent_id,
                payment_method=payment_method,
                refunded=False,
                status="succeeded",
            )
        return self._new(
            "pi",
            "payment_intent",
            id=intent_id,
            amount=amount,
            amount_received=amount if succeeded else 0,
            client_secret=f"{intent_id}_secret_{secrets.token_hex(8)}",
            currency="usd",
            customer=customer,
            last_payment_error=None,
            latest_charge=charge["id"] if charge else None,
            metadata=metadata,
            payment_method=payment_method,
            setup_future_usage=setup_future_usage,
            status="succeeded" if succeeded else "requires_payment_method",
        )

    def _create_account(self, params: dict[str, Any]) -> StripeObject:
        return self._new(
            "acct",
            "account",
            id=f"acct_{secrets.token_hex(8)}",
            capabilities=dict.fromkeys(params.get("capabilities", {}), "inactive"),
            charges_enabled=False,
            country=params.get("country", "US"),
            default_currency="usd",
            details_submitted=False,
            email=params.get("email"),
            metadata=params.get("metadata", {}),
            payouts_enabled=False,
            type=params.get("type", "standard"),
        )

    def _create_account_link(self, params: dict[str, Any]) -> StripeObject:
        _require(params, "account", "type", "return_url")
        account = self._existing(params["account"], "account")
        return {
            "object": "account_link",
            "created": int(time.time()),
            "expires_at": int(time.time()) + 300,
            "url": f"https://connect.stripe.com/setup/e/{account['id']}/{secrets.token_hex(8)}",
        }

    def _create_transfer(self, params: dict[str, Any]) -> StripeObject:
        _require(params, "amount", "currency", "destination")
        self._existing(params["destination"], "destination")
        transfer_id = new_id("tr")
        return self._new(
            "tr",
            "transfer",
            id=transfer_id,
            amount=int(params["amount"]),
            amount_reversed=0,
            balance_transaction=new_id("txn"),
            currency=params["currency"],
            destination=params["destination"],
            destination_payment=new_id("py"),
            metadata=params.get("metadata", {}),
            reversals={
                "object": "list",
                "data": [],
                "has_more": False,
                "total_count": 0,
                "url": f"/v1/transfers/{transfer_id}/reversals",
            },
            reversed=False,
            transfer_group=params.get("transfer_group"),
        )

    def _new(self, prefix: str, kind: str, **fields: Any) -> StripeObject:
        """Store a new object with the fields every Stripe object has; what Stripe shows."""
        obj = {
            "id": new_id(prefix),
            "object": kind,
            "created": int(time.time()),
            "livemode": False,
            "metadata": {},
            **fields,
        }
        self.objects[obj["id"]] = obj
        return _public(obj)

    def _existing(self, object_id: str, param: str) -> StripeObject:
        found = self.objects.get(object_id)
        if found is None:
            status = 404 if param == "id" else 400
            message = f"No such {param}: '{object_id}'"
            raise StripeApiError(status, message, code="resource_missing", param=param)
        return found

    # --- HTTP plumbing ----------------------------------------------------------------------

    def _respond(self, request: Recorded) -> _Answer | None:
        """The answer to one request, or None to drop the connection."""
        with self._lock:
            self.requests.append(request)
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(StripeApiError(401, "Invalid API Key provided."))
            faults = self._faults.get(request.path)
            fault = faults.pop(0) if faults else None
            if fault is not None and fault.drop and not fault.processed:
                return None
            answer = self._answer(request, fault if fault and not fault.drop else None)
            return None if fault is not None and fault.drop else answer

    def _answer(self, request: Recorded, fault: _Fault | None) -> _Answer:
        key = request.idempotency_key if request.method == "POST" else None
        fingerprint = (request.method, request.path, json.dumps(request.params, sort_keys=True))
        if key is not None and key in self._replies:
            seen, answer = self._replies[key]
            if seen != fingerprint:
                return _error(_idempotency_error(key))
            return _Answer(answer.status, answer.body, replayed=True)
        if fault is not None:
            answer = _Answer(fault.status, json.dumps({"error": fault.error}).encode())
        else:
            try:
                served = self._serve(request.method, request.path, request.params)
                answer = _Answer(200, json.dumps(served).encode())
            except StripeApiError as exc:
                answer = _error(exc)
        if key is not None:  # Stripe keeps errors too: a replay gets the same error
            self._replies[key] = (fingerprint, answer)
        return answer


def _idempotency_error(key: str) -> StripeApiError:
    return StripeApiError(
        400,
        "Keys for idempotent requests can only be used with the same parameters they were "
        f"first used with. Try using a key other than '{key}' if you meant to execute a "
        "different request.",
        type="idempotency_error",
    )


def _error(exc: StripeApiError) -> _Answer:
    return _Answer(exc.status, json.dumps({"error": exc.error}).encode())


_RETRIEVABLE = {"v1/checkout/sessions", "v1/accounts", "v1/customers", "v1/payment_intents"}


def _handler_for(fake: FakeStripe) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output quiet

        def _handle(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else url.query
            request = Recorded(
                method=self.command,
                path=url.path,
                params=decode_form(raw),
                headers={k.lower(): v for k, v in self.headers.items()},
            )
            answer = fake._respond(request)
            if answer is None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Request-Id", f"req_{secrets.token_hex(7)}")
            self.send_header("Stripe-Version", API_VERSION)
            if answer.replayed:
                self.send_header("Idempotent-Replayed", "true")
            if answer.status >= 400:
                self.send_header("Stripe-Should-Retry", "false")
            self.end_headers()
            self.wfile.write(answer.body)

    return _Handler


def decode_form(raw: str) -> dict[str, Any]:
    """Stripe's form encoding back to nested data: ``a[b][0][c]=1`` -> ``{"a": {"b": [{"c":
    "1"}]}}``. Values stay strings, as Stripe receives them."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        path = key.replace("]", "").split("[")
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {key: _lists(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def _require(params: dict[str, Any], *names: str) -> None:
    for name in names:
        if name not in params:
            message = f"Missing required param: {name}."
            raise StripeApiError(400, message, code="parameter_missing", param=name)


def _public(obj: StripeObject) -> StripeObject:
    """What Stripe shows of an object (the fake's own bookkeeping keys start with ``_``)."""
    return {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}
