"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against the real API
server and Celery worker: signing in, a task turning to succeed with its thumbnail, a failed task's
error, redelivering a webhook, what the admin and a key may each see, a phone's width.

IMAGEGATE_SCREENSHOTS=1 saves the README's screenshots under docs/."""

from __future__ import annotations

import os
import re
import secrets
import time
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import create_engine, update

from imagegate.app.keys import hash_key
from imagegate.app.models import ApiKey, utcnow
from tests.support.fake_receiver import Receiver
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key, start_api, stop_process
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
DOCS = Path(__file__).resolve().parents[2] / "docs"
SCREENSHOTS = os.environ.get("IMAGEGATE_SCREENSHOTS") == "1"


@pytest.fixture(scope="module")
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin_token() -> str:
    return "admin-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def dashboard_url(migrated, worker, env, run_dir, admin_token):
    """An API server of this module's own: the admin token set, its own address as the public URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = run_dir / "dashboard-api.log"
    process = start_api(env | {"IMAGEGATE_ADMIN_TOKEN": admin_token, "IMAGEGATE_PUBLIC_URL": url}, log, port)
    yield url
    stop_process(process)


@pytest.fixture(scope="module")
def api(dashboard_url, api_key):
    with httpx.Client(base_url=dashboard_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: scripts/browser installs it (scripts/test runs it)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _page(browser, viewport) -> Page:
    page = browser.new_context(viewport=viewport).new_page()
    page.set_default_timeout(15_000)
    return page


@pytest.fixture
def page(browser):
    page = _page(browser, LAPTOP)
    yield page
    page.context.close()


def sign_in(page: Page, url: str, secret: str) -> None:
    page.goto(f"{url}/dashboard")
    page.fill("#secret", secret)
    page.get_by_role("button", name="Sign in").click()


def assert_fits(page: Page) -> None:
    """The page is no wider than the screen; a failure names the elements that stick out."""
    width = page.evaluate("document.documentElement.scrollWidth")
    sticking_out = page.evaluate(
        """() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > innerWidth + 0.5)
            .map(e => `${e.tagName.toLowerCase()}.${e.className} (${Math.round(e.getBoundingClientRect().right)} px):`
                      + ` ${e.textContent.trim().slice(0, 60)}`)"""
    )
    assert width <= page.viewport_size["width"], f"the page is {width} px wide: {sticking_out}"


def row(page: Page, task_id: str):
    return page.locator(f'li[data-task-id="{task_id}"]')


def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:  # once the images in view have loaded
        page.wait_for_function(
            "[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"
        )
        page.screenshot(path=str(DOCS / name))


def test_a_bad_key_is_refused_with_a_message_and_pages_need_signing_in(page, dashboard_url):
    response = page.goto(f"{dashboard_url}/dashboard/batches")
    assert response.ok and "/dashboard/signin" in page.url  # redirected there
    sign_in(page, dashboard_url, "ig_" + secrets.token_urlsafe(32))
    expect(page.get_by_role("alert")).to_have_text("That API key or admin token is not valid.")
    sign_in(page, dashboard_url, "not-the-admin-token")
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    assert "/dashboard/signin" in page.url


def test_a_task_appears_and_turns_to_succeed_with_its_thumbnail(page, dashboard_url, api_key, api, upstream, prompt):
    sign_in(page, dashboard_url, api_key)
    expect(page.get_by_test_id("viewer")).to_have_text("Key · tests")
    expect(page.get_by_test_id("workers")).to_contain_text(re.compile(r"[1-9]\d* workers?"))
    expect(page.get_by_test_id("queues")).to_contain_text("batch")  # Redis: a depth per queue, not n/a

    upstream.script(prompt, Step(delay_s=3))
    task_id = submit_async(api, model="fake-dalle", prompt=prompt, response_format="url")
    # No reload by the test: the first page refreshes itself while it shows the newest tasks.
    expect(row(page, task_id)).to_be_visible(timeout=15_000)
    expect(row(page, task_id)).to_contain_text(prompt)
    expect(row(page, task_id)).to_have_attribute("data-status", "succeed", timeout=30_000)
    thumbnail = row(page, task_id).locator("img")
    expect(thumbnail).to_be_visible()
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=thumbnail.element_handle())


def test_a_failed_task_shows_its_error_and_attempts(page, dashboard_url, api_key, api, upstream, prompt):
    message = f"Your prompt was refused by the safety system ({uuid.uuid4().hex[:6]})"
    upstream.script(prompt, Step(status=400, message=message))
    task_id = submit_async(api, model="fake-dalle", prompt=prompt)
    assert wait_for_end(api, task_id)["task_status"] == "failed"

    sign_in(page, dashboard_url, api_key)
    page.goto(f"{dashboard_url}/dashboard/?status=failed")
    expect(row(page, task_id)).to_have_attribute("data-status", "failed")
    row(page, task_id).get_by_role("link").click()
    expect(page.get_by_test_id("task-id")).to_have_text(task_id)
    expect(page.get_by_test_id("task-error")).to_contain_text(message)
    expect(page.get_by_test_id("attempts")).to_contain_text("400")
    screenshot(page, "dashboard-task.png")


def test_redeliver_a_webhook_from_the_task_page(page, dashboard_url, api_key, api, receiver):
    url = receiver.url()
    task_id = submit_async(api, model="local", prompt="a webhook to send twice", size="64x64", callback_url=url)
    wait_until(lambda: receiver.hits(url), 30, "the first delivery")

    sign_in(page, dashboard_url, api_key)
    page.goto(f"{dashboard_url}/dashboard/tasks/{task_id}")
    deliveries = page.get_by_test_id("deliveries")
    expect(deliveries.locator("tbody tr")).to_have_count(1)
    expect(deliveries).to_contain_text("200")
    deliveries.get_by_role("button", name="Redeliver").click()
    expect(page.get_by_role("status")).to_contain_text("queued for delivery again")

    wait_until(lambda: len(receiver.hits(url)) == 2, 30, "the redelivery")
    first, second = receiver.hits(url)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    page.reload()
    expect(page.get_by_test_id("deliveries").locator("tbody tr")).to_have_count(2)


def test_the_admin_sees_every_key_and_a_key_only_its_own(browser, dashboard_url, api_key, other_key, admin_token):
    with httpx.Client(base_url=dashboard_url, headers={"Authorization": f"Bearer {other_key}"}) as other:
        theirs = submit_async(other, model="local", prompt="someone else's lighthouse", size="64x64")
        wait_for_end(other, theirs)

    key_page = _page(browser, LAPTOP)
    sign_in(key_page, dashboard_url, api_key)
    assert key_page.goto(f"{dashboard_url}/dashboard/tasks/{theirs}").status == 404
    expect(key_page.get_by_role("heading", name="Not found")).to_be_visible()
    key_page.goto(f"{dashboard_url}/dashboard/")
    expect(row(key_page, theirs)).to_have_count(0)
    key_page.context.close()

    admin_page = _page(browser, LAPTOP)
    sign_in(admin_page, dashboard_url, admin_token)
    expect(admin_page.get_by_test_id("viewer")).to_have_text("Admin · every key")
    admin_page.get_by_label("Key").select_option(label="someone-else")
    admin_page.get_by_role("button", name="Filter").click()
    expect(row(admin_page, theirs)).to_contain_text("someone-else")
    row(admin_page, theirs).get_by_role("link").click()
    expect(admin_page.get_by_test_id("task-id")).to_have_text(theirs)
    expect(admin_page.get_by_test_id("images").locator("img")).to_have_count(1)

    admin_page.get_by_role("button", name="Sign out").click()
    admin_page.goto(f"{dashboard_url}/dashboard/tasks/{theirs}")
    assert "/dashboard/signin" in admin_page.url
    admin_page.context.close()


def test_a_batch_shows_its_progress_and_its_tasks_page_by_page(page, dashboard_url, api_key, api):
    lines = [
        {"custom_id": str(n), "body": {"model": "local", "prompt": f"tile {n}", "size": "16x16"}} for n in range(27)
    ]
    response = api.post("/v1/images/batches", json={"requests": lines})
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]

    sign_in(page, dashboard_url, api_key)
    page.goto(f"{dashboard_url}/dashboard/batches")
    batch = page.locator(f'li[data-batch-id="{batch_id}"]')
    expect(batch).to_have_attribute("data-status", "completed", timeout=60_000)  # the page refreshes itself
    expect(batch).to_contain_text("27 of 27 ended (100%)")
    expect(batch).to_contain_text("27 succeed")

    batch.get_by_role("link").click()
    expect(page.get_by_label("Batch")).to_have_value(batch_id)
    first = page.locator("li[data-task-id]").evaluate_all("rows => rows.map(row => row.dataset.taskId)")
    page.get_by_role("link", name="Older →").click()
    rest = page.locator("li[data-task-id]").evaluate_all("rows => rows.map(row => row.dataset.taskId)")
    assert len(first) == 25 and len(rest) == 2 and not set(first) & set(rest)
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)
    page.get_by_role("link", name="← Newest").click()
    expect(page.locator("li[data-task-id]")).to_have_count(25)


def test_the_session_cookie_holds_no_key_and_forms_need_its_token(dashboard_url, api_key):
    with httpx.Client(base_url=dashboard_url) as http:
        form = http.get("/dashboard/signin")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        cookie = form.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/dashboard" in cookie

        forged = http.post("/dashboard/signin", data={"csrf": "forged", "secret": api_key})
        assert forged.status_code == 400 and "expired" in forged.text

        signed_in = http.post("/dashboard/signin", data={"csrf": token, "secret": api_key})
        assert signed_in.status_code == 303
        session = http.cookies["imagegate_dashboard"]
        assert api_key not in session and api_key[3:20] not in session
        assert http.get("/dashboard/").status_code == 200
        # Signed in, a POST without the session's token is still refused.
        assert http.post("/dashboard/signout").status_code == 400
        assert http.get("/dashboard/").status_code == 200


def test_a_revoked_keys_session_ends(dashboard_url, env, database_url):
    key = create_key(env, f"revoked-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=dashboard_url) as http:
        token = re.search(r'name="csrf" value="([^"]+)"', http.get("/dashboard/signin").text).group(1)
        assert http.post("/dashboard/signin", data={"csrf": token, "secret": key}).status_code == 303
        assert http.get("/dashboard/").status_code == 200
        engine = create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(key)).values(revoked_at=utcnow()))
        engine.dispose()
        page = http.get("/dashboard/")
        assert page.status_code == 302 and "/dashboard/signin" in page.headers["location"]


def test_readable_on_a_phone(browser, dashboard_url, api_key, api, upstream):
    refused = f"a castle in the clouds {uuid.uuid4().hex[:4]}"
    # A long error code and an upstream message with a long unbroken token wrap, not widen the page.
    message = "The upstream refused this prompt: https://upstream.example/policy/" + "a" * 80
    upstream.script(refused, Step(status=400, message=message, error_code="content_policy_violation"))
    submit_async(api, model="fake-dalle", prompt=refused)
    for prompt in ("a lighthouse at dusk", "a red fox in the snow", "a paper boat on a pond"):
        submit_async(api, model="local", prompt=prompt, size="256x256", response_format="url")
    running = f"a slow mountain sunrise {uuid.uuid4().hex[:4]}"
    upstream.script(running, Step(delay_s=4))
    submit_async(api, model="fake-dalle", prompt=running)
    time.sleep(1.5)

    phone = _page(browser, PHONE)
    sign_in(phone, dashboard_url, api_key)
    expect(phone.locator("li[data-task-id]").first).to_be_visible()
    assert_fits(phone)
    screenshot(phone, "dashboard-phone.png")
    phone.locator("li[data-status=failed] a").first.click()
    expect(phone.get_by_test_id("task-error")).to_be_visible()
    assert_fits(phone)
    phone.context.close()

    laptop = _page(browser, LAPTOP)
    sign_in(laptop, dashboard_url, api_key)
    expect(laptop.locator("li[data-task-id]").first).to_be_visible()
    screenshot(laptop, "dashboard.png")
    laptop.context.close()
