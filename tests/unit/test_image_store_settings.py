"""The image store's settings, the purge command's durations, and the worker's put retried through
an outage of the store (a real directory store behind a failing first few puts)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from imagegate.app.commands.images import parse_duration
from imagegate.app.image_store import DatabaseImages, DirectoryImages, make_image_store
from imagegate.app.settings import Settings, SettingsError
from imagegate.app.stores.attempts import NewImage
from imagegate.workers.images import put_while_leased

SECRET = {"secret_key": "s" * 40}


@pytest.mark.parametrize(
    "text,seconds",
    [("7d", 604_800), ("12h", 43_200), ("30m", 1800), ("45s", 45), ("3600", 3600), ("0", 0), ("2D", 172_800)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "-1d", "1.5h", "d", "7 days", "1e3"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_defaults_keep_todays_behaviour_and_a_week_of_images():
    settings = Settings(**SECRET).check()
    assert settings.image_store == "postgres" and settings.image_urls == "gateway"
    assert settings.image_retention_s == 604_800
    assert isinstance(make_image_store(settings), DatabaseImages)


def test_the_directory_store_defaults_under_the_data_dir(tmp_path):
    settings = Settings(image_store="dir", data_dir=tmp_path, embedded=True).check()
    store = make_image_store(settings)
    assert isinstance(store, DirectoryImages) and store.root == tmp_path / "images"
    assert make_image_store(Settings(image_store="dir", image_dir=tmp_path / "x", **SECRET)).root == tmp_path / "x"


@pytest.mark.parametrize(
    "values,named",
    [
        ({"image_urls": "store"}, "IMAGEGATE_IMAGE_URLS=store needs IMAGEGATE_IMAGE_STORE=s3"),
        ({"image_store": "s3"}, "IMAGEGATE_S3_BUCKET"),
        ({"image_store": "dir"}, "IMAGEGATE_IMAGE_DIR"),
        (
            {"image_store": "s3", "s3_bucket": "b", "image_urls": "store", "image_url_ttl_s": 8 * 86_400},
            "IMAGEGATE_IMAGE_URL_TTL_S",
        ),
    ],
)
def test_settings_that_cannot_work_stop_start_up(values, named):
    with pytest.raises(SettingsError, match=named):
        Settings(**SECRET, **values).check()


class FailingFirst(DirectoryImages):
    """A directory whose first `failures` puts fail, as a store that is briefly away."""

    def __init__(self, root: Path, failures: int):
        super().__init__(root)
        self.failures = failures

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("store unavailable")
        super().put(key, data, content_type)


def test_a_put_is_retried_through_a_short_outage_of_the_store(tmp_path):
    store = FailingFirst(tmp_path, failures=2)
    (image,) = put_while_leased(store, uuid.uuid4(), [NewImage(b"\x89PNG-bytes", "image/png")], lambda: 60.0)
    assert store.get(image.key) == b"\x89PNG-bytes"


def test_a_put_gives_up_when_the_lease_runs_out(tmp_path):
    store = FailingFirst(tmp_path, failures=1000)
    with pytest.raises(OSError):
        put_while_leased(store, uuid.uuid4(), [NewImage(b"\x89PNG", "image/png")], lambda: 1.0)


def test_a_put_that_fails_halfway_takes_back_what_it_put(tmp_path):
    class SecondFails(DirectoryImages):
        puts = 0

        def put(self, key, data, content_type):
            self.puts += 1
            if self.puts == 2:
                raise OSError("disk full")
            super().put(key, data, content_type)

    store = SecondFails(tmp_path)
    with pytest.raises(OSError):
        put_while_leased(store, uuid.uuid4(), [NewImage(b"a", "image/png"), NewImage(b"b", "image/png")], lambda: 0.0)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []
