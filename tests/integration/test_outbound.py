"""The outbound policy (workers.outbound) for URLs that clients or upstreams hand us: the address
checked is the address connected to, whatever a later DNS answer says; an upstream's own origin is
trusted for its images, any other private address refused. End to end through a real worker too.

No test sends traffic anywhere but 127.0.0.1: made-up names are answered by a fake resolver, and a
connection to the one public address used is refused before it leaves the machine.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import httpx
import pytest

from imagegate.app.providers import ModelConfig
from imagegate.app.settings import Settings
from imagegate.app.ssrf import UnsafeUrl
from imagegate.workers import http, outbound
from imagegate.workers.adapters.base import UpstreamError, UpstreamImage
from imagegate.workers.images import fetch_images
from tests.support.fake_http import png_bytes
from tests.support.fake_upstream import Step
from tests.support.processes import start_worker, stop_process
from tests.support.services import start_redis

PUBLIC = "93.184.216.34"  # passes the check; connections to it are refused by the `network` fixture


class ImageServer:
    """Serves a PNG on every GET and counts the connections it accepted."""

    def __init__(self) -> None:
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, to see connections reused

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests += 1
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/image.png"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def images():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture
def dns(monkeypatch):
    """Answers for made-up names, one list per lookup (the last one repeats); other names resolve
    for real. Returns (answers, lookups)."""
    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        replies = answers[host]
        addresses = replies.pop(0) if len(replies) > 1 else replies[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


@pytest.fixture
def network(monkeypatch):
    """Records the host of every TCP connection httpx opens; the public address is unreachable."""
    real = httpcore.SyncBackend.connect_tcp
    connects: list[str] = []

    def connect_tcp(self, host, port, *args, **kwargs):
        connects.append(host)
        if host == PUBLIC:
            raise httpcore.ConnectError("no traffic leaves the machine in tests")
        return real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect_tcp)
    return connects


# --- pinning ---------------------------------------------------------------------------------


def test_a_name_that_rebinds_after_the_check_cannot_reach_a_private_address(images, dns, network):
    answers, lookups = dns
    # A public address for the check, then loopback for whoever asks again (DNS rebinding).
    answers["rebind.example.test"] = [[PUBLIC], ["127.0.0.1"]]
    url = images.url("rebind.example.test")

    with outbound.make_client(allow_private=False) as client, pytest.raises(httpx.ConnectError):
        client.get(url)
    assert lookups == ["rebind.example.test"] and network == [PUBLIC]
    assert images.requests == 0

    # The second answer does lead to the server: an unpinned client, resolving again, gets there.
    with httpx.Client(trust_env=False) as unpinned:
        assert unpinned.get(url).status_code == 200
    assert images.requests == 1


def test_every_address_is_checked_and_one_private_one_refuses(dns, network):
    answers, _ = dns
    answers["mixed.example.test"] = [[PUBLIC, "10.0.0.1"]]
    with outbound.make_client(allow_private=False) as client, pytest.raises(UnsafeUrl, match="10.0.0.1"):
        client.get("http://mixed.example.test/image.png")
    assert network == []


def test_private_addresses_need_allow_private(images, network):
    with outbound.make_client(allow_private=False) as strict, pytest.raises(UnsafeUrl, match="loopback"):
        strict.get(images.url("localhost"))
    assert network == [] and images.requests == 0
    with outbound.make_client(allow_private=True) as lenient:
        assert lenient.get(images.url("localhost")).content == png_bytes()


def test_kept_alive_connections_are_reused_by_name_without_a_new_lookup(images, dns, network):
    answers, lookups = dns
    answers["cdn.example.test"] = [["127.0.0.1"]]
    with outbound.make_client(allow_private=True) as client:
        for _ in range(3):
            assert client.get(images.url("cdn.example.test")).status_code == 200
    assert network == ["127.0.0.1"] and lookups == ["cdn.example.test"] and images.requests == 3


def test_an_environment_proxy_is_not_used(images, network, monkeypatch):
    # A proxy would make the connection itself, to an address nobody checked.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with outbound.make_client(allow_private=True) as client:
        assert client.get(images.url()).status_code == 200
    assert network == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("url", "base_url", "same"),
    [
        ("http://127.0.0.1:8080/files/a.png", "http://127.0.0.1:8080/v1", True),
        ("HTTP://Relay.Example.com/a.png", "http://relay.example.com:80/v1", True),
        ("https://relay.example.com/a.png", "http://relay.example.com/v1", False),
        ("http://127.0.0.1:8081/a.png", "http://127.0.0.1:8080/v1", False),
        ("http://localhost:8080/a.png", "http://127.0.0.1:8080/v1", False),
        ("http://127.0.0.1:8080@10.0.0.1/a.png", "http://127.0.0.1:8080/v1", False),
        ("http://127.0.0.1:8080/a.png", None, False),
        ("not a url at all", "http://127.0.0.1:8080/v1", False),
    ],
)
def test_same_origin(url, base_url, same):
    assert outbound.same_origin(url, base_url) is same


# --- image downloads -------------------------------------------------------------------------


def fetch(url: str, base_url: str, *, allow_private: bool = False) -> bytes:
    config = ModelConfig(name="m", adapter="openai", base_url=base_url, allow_private_downloads=allow_private)
    checked = outbound.CheckedClients()
    try:
        with http.make_client() as upstream_client:
            [image] = fetch_images(
                [UpstreamImage(url=url)],
                client=upstream_client,
                checked=checked,
                config=config,
                settings=Settings(secret_key="x"),
            )
    finally:
        checked.close()
    return image.data


def test_images_on_the_models_own_private_origin_are_trusted(images):
    assert fetch(images.url(), f"http://127.0.0.1:{images.port}/v1") == png_bytes()


def test_images_on_another_private_origin_are_refused_unless_the_model_allows_it(images):
    own_origin = f"http://localhost:{images.port}/v1"  # the same server named otherwise: another origin
    with pytest.raises(UpstreamError, match="image URL refused.*loopback") as refused:
        fetch(images.url(), own_origin)
    assert not refused.value.retryable and images.requests == 0
    assert fetch(images.url(), own_origin, allow_private=True) == png_bytes()


@pytest.mark.parametrize("url", ["", "ftp://127.0.0.1/a.png", "file:///etc/passwd", "http://[::1/a.png"])
def test_malformed_image_urls_are_refused_for_good(url):
    with pytest.raises(UpstreamError, match="image URL refused") as refused:
        fetch(url, "http://127.0.0.1:9/v1")
    assert not refused.value.retryable


# --- end to end: a worker of its own, its models allowing no private downloads ------------------


@pytest.fixture(scope="module")
def strict_gateway(env, settings, migrated, upstream, api_key, tmp_path_factory):
    """The in-process API and a real worker with their own Redis, serving two models over the fake
    upstream on 127.0.0.1, neither with allow_private_downloads: `self-hosted` by the address its
    image URLs use, `by-name` by another name, so those URLs are on another origin than its own."""
    directory = tmp_path_factory.mktemp("strict")
    providers = directory / "providers.toml"
    providers.write_text(f"""
[models."self-hosted"]
adapter = "openai"
base_url = "{upstream.base_url}"

[models."by-name"]
adapter = "openai"
base_url = "http://localhost:{upstream.port}/v1"
""")
    redis_server = start_redis()
    broker_url = f"{redis_server.url}/0"
    log = directory / "worker.log"
    worker = start_worker(env | {"IMAGEGATE_BROKER_URL": broker_url, "IMAGEGATE_PROVIDERS_FILE": str(providers)}, log)
    try:
        from imagegate.app.web import create_app

        app = create_app(settings.model_copy(update={"broker_url": broker_url, "providers_file": providers}))
        yield app.test_client(), {"Authorization": f"Bearer {api_key}"}
    finally:
        stop_process(worker)
        redis_server.stop()


def _run(gateway, model: str, prompt: str) -> dict:
    api, headers = gateway
    response = api.post(
        "/v1/images/generations",
        headers=headers,
        json={"model": model, "prompt": prompt, "async": True, "response_format": "url"},
    )
    assert response.status_code == 202, response.text
    task_id = response.get_json()["task_id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = api.get(f"/v1/images/{task_id}", headers=headers).get_json()
        if body["task_status"] in ("succeed", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not end: {body}")


@pytest.mark.e2e
def test_a_self_hosted_upstream_on_loopback_serves_its_own_image_urls(strict_gateway, upstream):
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    upstream.script(prompt, Step(as_url=True))  # URLs on 127.0.0.1, the model's own origin
    body = _run(strict_gateway, "self-hosted", prompt)
    assert body["task_status"] == "succeed", body
    assert len(body["data"]) == 1 and "/files/images/" in body["data"][0]["url"]


@pytest.mark.e2e
def test_image_urls_on_another_private_origin_are_refused(strict_gateway, upstream):
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    upstream.script(prompt, Step(as_url=True))  # URLs on 127.0.0.1, not on the model's localhost
    body = _run(strict_gateway, "by-name", prompt)
    assert body["task_status"] == "failed" and body["error"]["code"] == "upstream_bad_response", body
    assert "image URL refused" in body["error"]["message"] and "loopback" in body["error"]["message"]
    assert len(upstream.calls_for(prompt)) == 1  # refused for good: not retried
