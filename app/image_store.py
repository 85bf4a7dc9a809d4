"""Where image bytes live, chosen by IMAGEGATE_IMAGE_STORE: in the images table (`postgres`, the
default), in a directory (`dir`), or in an S3-compatible bucket (`s3`).

Every backend has the same small interface: `put`, `get`, `delete` and `url` (a presigned URL, only
object storage has one). The `images` rows stay in the database with every backend: a row holds its
bytes (`data`, the postgres backend) or the key they were put under (`store_key`). A row is read
through the key it has, so rows written before a switch from `postgres` keep being served.

The worker puts an image's bytes before the transaction that writes its row and the task's end
(app/stores/attempts.py), so a task never succeeds with bytes that are not stored. Bytes put for a
write that then was refused or failed are deleted again (workers/runner.py); only a process killed
between the two leaves unreferenced bytes behind, which nothing ever serves.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from imagegate.app.image_urls import EXTENSIONS
from imagegate.app.settings import Settings, SettingsError


class ImageStore(Protocol):
    # True: the bytes are kept in the images row itself, and put/get/delete have nothing to do.
    in_rows: bool

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store the bytes durably under `key` (done when it returns), replacing any there."""

    def get(self, key: str) -> bytes | None:
        """The bytes under `key`, None when there are none (deleted, or never stored)."""

    def delete(self, keys: Iterable[str]) -> None:
        """Remove the bytes of every key; a key with nothing under it is not an error."""

    def url(self, key: str, content_type: str, ttl_s: int) -> str | None:
        """A URL anyone can fetch the bytes from for ttl_s seconds, or None when the store hands out none."""


def image_key(task_id: uuid.UUID, image_id: uuid.UUID, content_type: str) -> str:
    """Grouped by task, so a task's images sit together (a directory each, a common prefix in a bucket)."""
    return f"{task_id}/{image_id}.{EXTENSIONS.get(content_type, 'bin')}"


class DatabaseImages:
    """`postgres`: the bytes are the images row's `data` column (in SQLite in the embedded mode)."""

    in_rows: ClassVar[bool] = True

    def put(self, key: str, data: bytes, content_type: str) -> None:
        raise TypeError("the database store keeps bytes in the images rows; nothing is put")

    def get(self, key: str) -> bytes | None:
        return None  # a row of this store has no key; one with a key was written by another store

    def delete(self, keys: Iterable[str]) -> None:
        pass  # deleting the rows deletes the bytes

    def url(self, key: str, content_type: str, ttl_s: int) -> str | None:
        return None


class DirectoryImages:
    """`dir`: one file per image under `root` (a local disk or a shared mount every process sees)."""

    in_rows: ClassVar[bool] = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):  # keys come from our rows; refuse any other
            raise ValueError(f"image key {key!r} is outside the image directory")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, flushed to disk, then renamed: a reader never sees half an image, and the
        # bytes survive a crash once put returns (the row that points at them commits after).
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself
        finally:
            os.close(directory)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in parents:  # a task's directory goes with its last image
            try:
                parent.rmdir()
            except OSError:
                pass

    def url(self, key: str, content_type: str, ttl_s: int) -> str | None:
        return None


class S3Images:
    """`s3`: objects `{prefix}{key}` in a bucket of any S3-compatible service (AWS, MinIO, R2, Ceph...).
    Credentials come the way boto3 finds them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
    an instance role); the endpoint, bucket and prefix from IMAGEGATE_S3_*."""

    in_rows: ClassVar[bool] = False

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None, region: str | None = None):
        import boto3  # only a process whose store is S3 loads boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        config = Config(
            signature_version="s3v4",  # presigned URLs too (valid up to 7 days)
            # A custom endpoint (MinIO, a test server) is addressed by path: no wildcard DNS needed.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
        )
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def _object(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def delete(self, keys: Iterable[str]) -> None:
        objects = [{"Key": self._object(key)} for key in keys]
        for start in range(0, len(objects), 1000):  # DeleteObjects takes at most 1000 keys
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects[start : start + 1000], "Quiet": True}
            )
            if answer.get("Errors"):
                error = answer["Errors"][0]
                raise OSError(f"could not delete {error.get('Key')}: {error.get('Code')} {error.get('Message')}")

    def url(self, key: str, content_type: str, ttl_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=ttl_s
        )


def image_dir(settings: Settings) -> Path | None:
    """IMAGEGATE_IMAGE_DIR, or `images` under the data directory (the embedded mode's)."""
    if settings.image_dir is not None:
        return settings.image_dir
    return settings.data_dir / "images" if settings.data_dir is not None else None


def make_image_store(settings: Settings) -> ImageStore:
    if settings.image_store == "dir":
        root = image_dir(settings)
        if root is None:
            raise SettingsError("IMAGEGATE_IMAGE_STORE=dir needs IMAGEGATE_IMAGE_DIR (or IMAGEGATE_DATA_DIR)")
        return DirectoryImages(root)
    if settings.image_store == "s3":
        if not settings.s3_bucket:
            raise SettingsError("IMAGEGATE_IMAGE_STORE=s3 needs IMAGEGATE_S3_BUCKET")
        return S3Images(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    return DatabaseImages()
