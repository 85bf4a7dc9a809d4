"""Webhook building blocks: SSRF checks (app.ssrf), Standard Webhooks signing (app.webhook_signing),
the retry schedule (app.settings) and one delivery attempt (workers.webhook_post) against a real
receiver on 127.0.0.1.

No test sends traffic anywhere but 127.0.0.1: name lookups other than "localhost" are faked.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from standardwebhooks.webhooks import EmptyWebhookSecretError

from imagegate.app.settings import Settings, parse_retry_schedule
from imagegate.app.ssrf import UnsafeUrl, check_address, resolve_public
from imagegate.app.webhook_signing import new_secret, signature_header
from imagegate.workers import outbound
from imagegate.workers.webhook_post import deliver

HUGE = 64 * 1024 * 1024  # larger than any loopback socket buffers, so a capped read must cut it short


class Receiver:
    """A webhook receiver whose answer depends on the path; records what it got and what it sent."""

    def __init__(self, certfile: str | None = None):
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.sent_bytes = 0
        self.finished = threading.Event()  # set when /huge stops writing
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append((self.path, dict(self.headers), body))
                try:
                    receiver.answer(self)
                except OSError:
                    pass  # the client hung up, as the deadline and the cap make it do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certfile)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if path in ("/ok", "/fail", "/gone", "/redirect"):
            status = {"/ok": 200, "/fail": 500, "/gone": 410, "/redirect": 302}[path]
            reply = b'{"received": true}' if status == 200 else b"nope"
            handler.send_response(status)
            if status == 302:
                handler.send_header("Location", "/ok")
            handler.send_header("Content-Length", str(len(reply)))
            handler.end_headers()
            handler.wfile.write(reply)
        elif path == "/trickle-body":  # headers at once, then a byte every 0.1 s for 10 s
            handler.send_response(200)
            handler.send_header("Content-Length", "100")
            handler.end_headers()
            for _ in range(100):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.1)
        elif path == "/trickle-headers":  # never finishes its headers within 10 s
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(100):
                handler.wfile.write(b"a")
                handler.wfile.flush()
                time.sleep(0.1)
        elif path == "/huge":
            handler.send_response(200)
            handler.send_header("Content-Length", str(HUGE))
            handler.end_headers()
            chunk = b"y" * 65536
            try:
                while self.sent_bytes < HUGE:
                    handler.wfile.write(chunk)
                    self.sent_bytes += len(chunk)
            finally:
                self.finished.set()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def fake_dns(monkeypatch):
    """Answers for made-up names; every other lookup goes to the real resolver (numeric hosts)."""
    real = socket.getaddrinfo
    answers: dict[str, list] = {}  # name -> list of addresses, or a callable returning one
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            lookups.append(host)
            addresses = answers[host]() if callable(answers[host]) else answers[host]
            if not addresses:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
                for a in addresses
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


def send(
    url: str,
    *,
    secrets: list[str] | None = None,
    body: bytes = b'{"event": "task.succeeded"}',
    headers: dict | None = None,
    allow_private: bool = True,
    client: httpx.Client | None = None,
    **kwargs,
):
    if client is None:
        with outbound.make_client(allow_private=allow_private) as client:
            return send(url, secrets=secrets, body=body, headers=headers, client=client, **kwargs)
    return deliver(
        client,
        url,
        body,
        headers or {},
        secrets=secrets or [new_secret()],
        msg_id="msg_test1",
        timestamp=int(time.time()),
        **kwargs,
    )


# --- signing ---------------------------------------------------------------------------------


def test_signing_matches_the_standard_webhooks_test_vector():
    assert (
        signature_header(
            ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_new_secrets_are_random_24_byte_keys():
    first, second = new_secret(), new_secret()
    assert first != second and first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 24


def test_signature_header_has_one_signature_per_secret():
    old, new = new_secret(), new_secret()
    value = signature_header([old, new], "msg_1", 1700000000, b"{}")
    assert value.split(" ") == [
        signature_header([old], "msg_1", 1700000000, b"{}"),
        signature_header([new], "msg_1", 1700000000, b"{}"),
    ]
    assert value.split(" ")[0] != value.split(" ")[1]


@pytest.mark.parametrize("secret", ["whsec_", ""])
def test_empty_secrets_are_refused(secret):
    with pytest.raises(EmptyWebhookSecretError):
        signature_header([secret], "msg_1", 1700000000, b"{}")


def test_signing_needs_a_secret():
    with pytest.raises(ValueError, match="at least one"):
        signature_header([], "msg_1", 1700000000, b"{}")


# --- delivery --------------------------------------------------------------------------------


def test_delivery_is_signed_with_every_rotated_secret(receiver):
    old, new = new_secret(), new_secret()
    body = json.dumps({"type": "task.succeeded", "data": {"task_id": "t1"}}).encode()
    result = send(receiver.url("/ok"), secrets=[old, new], body=body, headers={"X-Extra": "kept"})

    assert (result.status, result.error, result.disable) == (200, None, False)
    assert result.ok and result.reply == b'{"received": true}' and result.latency_ms >= 0
    [(_, headers, got)] = receiver.requests
    assert got == body
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "imagegate-webhooks"
    assert headers["webhook-id"] == "msg_test1"
    assert headers["host"] == f"127.0.0.1:{receiver.port}"
    assert headers["x-extra"] == "kept"
    # Each secret verifies on its own: a receiver holding either one accepts during the overlap.
    assert Webhook(old).verify(got, headers) == json.loads(body)
    assert Webhook(new).verify(got, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(got, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(got + b" ", headers)


def test_callers_headers_cannot_replace_the_signature(receiver):
    secret = new_secret()
    send(receiver.url("/ok"), secrets=[secret], headers={"Webhook-Signature": "v1,forged", "webhook-id": "x"})
    [(_, headers, body)] = receiver.requests
    assert headers["webhook-signature"] == signature_header(
        [secret], "msg_test1", int(headers["webhook-timestamp"]), body
    )
    assert headers["webhook-id"] == "msg_test1"
    assert Webhook(secret).verify(body, headers) == json.loads(body)


def test_private_receivers_need_allow_private(receiver):
    result = send(receiver.url("/ok"), allow_private=False)
    assert result.status is None and result.error.startswith("refused: ") and "loopback" in result.error
    assert not result.disable and receiver.requests == []


def test_connects_to_the_checked_address_without_a_second_lookup(receiver, fake_dns):
    answers, lookups = fake_dns
    # First answer: the receiver. A second lookup would get nothing (so the delivery would fail):
    # only the address that was checked may be connected to.
    replies = iter([["127.0.0.1"]])
    answers["hooks.example.test"] = lambda: next(replies, [])

    result = send(receiver.url("/ok", host="hooks.example.test"))

    assert result.status == 200, result.error
    assert lookups == ["hooks.example.test"]
    [(_, headers, _)] = receiver.requests
    assert headers["Host"] == f"hooks.example.test:{receiver.port}"


def test_server_error_is_a_failure(receiver):
    result = send(receiver.url("/fail"))
    assert (result.status, result.disable) == (500, False)
    assert result.error == "answered 500" and result.reply == b"nope"


def test_gone_disables_the_endpoint(receiver):
    result = send(receiver.url("/gone"))
    assert (result.status, result.disable) == (410, True)
    assert "410" in result.error


def test_redirects_are_not_followed(receiver):
    result = send(receiver.url("/redirect"))
    assert result.status == 302 and "redirect" in result.error and not result.disable
    assert receiver.paths == ["/redirect"]


def test_a_refused_connection_is_a_failure():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the delivery: nothing listens there
    result = send(f"http://127.0.0.1:{port}/ok")
    assert result.status is None and result.error.startswith("connection failed")


def test_the_deadline_holds_for_a_trickling_body(receiver):
    started = time.monotonic()
    result = send(receiver.url("/trickle-body"), deadline_s=2)
    assert time.monotonic() - started < 3
    # The status line decided the outcome; the body was read until the deadline, then dropped.
    assert result.status == 200 and result.error is None
    assert 0 < len(result.reply) < 100


def test_the_deadline_holds_for_trickling_headers(receiver):
    # Each byte arrives well within any per-read timeout: only a total deadline stops this.
    started = time.monotonic()
    result = send(receiver.url("/trickle-headers"), deadline_s=2)
    assert time.monotonic() - started < 3
    assert result.status is None and result.error == "no reply within 2 s"


def test_the_reply_read_is_capped(receiver):
    started = time.monotonic()
    result = send(receiver.url("/huge"), max_reply_bytes=1000)
    assert time.monotonic() - started < 3
    assert result.status == 200 and result.error is None
    assert len(result.reply) == 1000
    assert receiver.finished.wait(5)
    assert receiver.sent_bytes < HUGE  # the connection was dropped, not drained


def test_a_passed_in_client_is_used_and_left_open(receiver):
    with outbound.make_client(allow_private=True) as client:
        assert send(receiver.url("/ok"), client=client).status == 200
        assert send(receiver.url("/ok"), client=client).status == 200
        assert not client.is_closed
    assert receiver.paths == ["/ok", "/ok"]


def test_https_checks_the_certificate_against_the_hostname_not_the_address(tmp_path, fake_dns):
    """The connection goes to the checked IP, yet SNI and the certificate check use the name."""
    cert = tmp_path / "receiver.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=hooks.example.test",
                "-addext",
                "subjectAltName=DNS:hooks.example.test",
                "-keyout",
                str(cert),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("openssl is needed to make a test certificate")
    answers, _ = fake_dns
    answers["hooks.example.test"] = ["127.0.0.1"]
    answers["other.example.test"] = ["127.0.0.1"]
    server = Receiver(certfile=str(cert))
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        with outbound.make_client(allow_private=True, verify=trusted) as client:
            ok = send(server.url("/ok", host="hooks.example.test", scheme="https"), client=client)
            wrong_name = send(server.url("/ok", host="other.example.test", scheme="https"), client=client)
    finally:
        server.close()
    assert ok.status == 200, ok.error
    assert wrong_name.status is None and "connection failed" in wrong_name.error
    assert server.paths == ["/ok"]


# --- SSRF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://169.254.169.254/",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:8.8.8.8]/",  # mapped addresses are refused whatever they map to
        "http://100.64.0.1/",
        "http://[fc00::1]/",
        "http://[fe80::1]/",
        "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
        "http://0.0.0.0/",
        "http://[::]/",
        "http://224.0.0.1/",
        "http://[ff0e::1]/",
        "http://240.0.0.1/",
        "ftp://example.com/",
        "file:///etc/passwd",
        "http:///no-host",
        "http://localhost/",  # a name resolving to loopback
    ],
)
def test_unsafe_urls_are_refused(url):
    with pytest.raises(UnsafeUrl):
        resolve_public(url)


def test_localhost_is_refused_for_its_address():
    with pytest.raises(UnsafeUrl, match="loopback"):
        resolve_public("http://localhost:8080/hook")


def test_public_literals_pass_without_a_lookup(monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("a literal address needs no lookup")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    assert resolve_public("http://93.184.216.34/") == ("93.184.216.34", ["93.184.216.34"])
    assert resolve_public("https://[2606:4700:4700::1111]:8443/x") == ("2606:4700:4700::1111", ["2606:4700:4700::1111"])


def test_names_resolve_to_every_address_and_one_bad_one_refuses(fake_dns):
    answers, _ = fake_dns
    answers["public.example.test"] = ["93.184.216.34", "2606:4700:4700::1111"]
    answers["rebind.example.test"] = ["93.184.216.34", "10.1.2.3"]
    assert resolve_public("https://Public.Example.Test/hook") == (
        "public.example.test",
        ["93.184.216.34", "2606:4700:4700::1111"],
    )
    with pytest.raises(UnsafeUrl, match="10.1.2.3"):
        resolve_public("https://rebind.example.test/hook")


def test_an_unresolvable_host_is_refused(fake_dns):
    answers, _ = fake_dns
    answers["nowhere.example.test"] = []
    with pytest.raises(UnsafeUrl, match="does not resolve"):
        resolve_public("https://nowhere.example.test/")


def test_allow_private_skips_the_address_check():
    assert resolve_public("http://127.0.0.1:9/", allow_private=True) == ("127.0.0.1", ["127.0.0.1"])
    assert resolve_public("http://2130706433/", allow_private=True) == ("2130706433", ["127.0.0.1"])
    with pytest.raises(UnsafeUrl):  # the scheme is checked all the same
        resolve_public("gopher://127.0.0.1/", allow_private=True)


@pytest.mark.parametrize("ip", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip):
    check_address(ip)


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "100.64.0.1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
        "::",
        "239.1.1.1",
        "192.0.2.1",
        "fec0::1",
        "64:ff9b::7f00:1",
        "not-an-ip",
    ],
)
def test_non_public_addresses_are_refused(ip):
    with pytest.raises(UnsafeUrl):
        check_address(ip)


# --- retry schedule --------------------------------------------------------------------------


def test_retry_schedule_default_and_parsing():
    assert Settings().webhook_retry_delays_s == [5, 300, 1800, 7200, 18000, 36000, 86400]
    assert Settings(webhook_retry_schedule="5, 300,1800").webhook_retry_delays_s == [5.0, 300.0, 1800.0]
    assert parse_retry_schedule("0.5") == [0.5]


@pytest.mark.parametrize("text", ["5,,300", "abc", "5;300", "-1", "nan", "inf", "5,", "", " "])
def test_retry_schedule_refuses_invalid_text(text):
    with pytest.raises(ValueError, match="retry schedule"):
        parse_retry_schedule(text)
    with pytest.raises(ValueError, match="retry schedule"):  # at start-up, not at the first failed delivery
        Settings(webhook_retry_schedule=text)
