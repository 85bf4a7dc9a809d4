"""Every setting imagegate reads, with its default: the one place defaults are documented.

Settings come from `IMAGEGATE_*` environment variables (or keyword arguments in tests) and are
passed around as an object; nothing reads the environment at import time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A placeholder, never a usable secret: start-up refuses it outside the embedded mode.
DEFAULT_SECRET_KEY = "change-me"


def is_redis_url(url: object) -> bool:
    return str(url).startswith(("redis://", "rediss://"))


def is_amqp_url(url: object) -> bool:
    """A RabbitMQ broker (kombu's py-amqp transport)."""
    return str(url).startswith(("amqp://", "amqps://", "pyamqp://"))


class SettingsError(ValueError):
    """A setting that makes the process refuse to start."""


def parse_retry_schedule(text: str) -> list[float]:
    """Seconds before each webhook retry, from comma-separated numbers such as "5,300,1800"."""
    delays = []
    for item in text.split(","):
        try:
            delay = float(item)
        except ValueError:
            delay = math.nan
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(
                f"invalid webhook retry schedule {text!r}: expected comma-separated "
                f"non-negative numbers of seconds such as '5,300,1800', got {item.strip()!r}"
            )
        delays.append(delay)
    return delays


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGATE_", frozen=True, extra="ignore")

    # Where tasks, keys and image bytes live (SQLAlchemy URL; Postgres via psycopg 3).
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/imagegate"
    # Celery broker: Redis (redis://), RabbitMQ (amqp://user:password@host:5672/vhost), or the
    # embedded mode's filesystem://. A Redis broker also carries the task-ended pub/sub.
    broker_url: str = "redis://127.0.0.1:6379/0"
    # The Redis for what is not a task message: the task-ended wake-ups of synchronous requests and
    # the rate-limit counters every API process shares. Unset: the broker's, when it is Redis. Needed
    # with a RabbitMQ broker (the README's "Picking a broker" says why).
    redis_url: str | None = None
    # TOML file declaring the models served; without one, the built-in `local` model is served.
    providers_file: Path | None = None
    # Signs image URLs.
    secret_key: str = DEFAULT_SECRET_KEY
    # Base of the absolute image URLs handed to clients.
    public_url: str = "http://127.0.0.1:8000"
    # How long a synchronous request waits before answering 202 with the task id.
    sync_timeout_s: float = Field(300.0, gt=0)
    # Largest request body accepted (base64 input images make bodies large).
    max_body_bytes: int = Field(25 * 1024 * 1024, gt=0)
    # POST /v1/images/edits: largest input file (each image, the mask) and most images per request.
    # The whole multipart body is bounded by max_body_bytes as well.
    max_input_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_input_images: int = Field(16, ge=1)
    # An authenticated API key is remembered in each API process this long: no database lookup per
    # request, so revoking a key takes effect within this time. 0 looks the key up on every request.
    key_cache_ttl_s: float = Field(15.0, ge=0)
    # Longest time to receive a request body once its headers arrived: a client trickling its body
    # gets 408 and the connection is closed, instead of holding a connection slot indefinitely.
    body_timeout_s: float = Field(30.0, gt=0)
    # Requests in progress from one client address, per API process; more get 429 at once.
    max_requests_per_client: int = Field(1000, ge=1)
    # Per-key limits at intake for keys that set none of their own (`imagegate keys create/update
    # --rpm/--images-per-day/--max-pending`); 0 is no limit. Requests per minute (a batch counts
    # its lines), images per day (each request's n), tasks pending or running at once.
    default_rpm: int = Field(0, ge=0)
    default_images_per_day: int = Field(0, ge=0)
    default_max_pending: int = Field(0, ge=0)
    # How long a signed image URL stays valid (OpenAI's expire after an hour too).
    image_url_ttl_s: int = Field(3600, gt=0)
    # Browser origins allowed to call the API (CORS), comma-separated, such as
    # "https://app.example.com,http://localhost:3000"; "*" allows any; empty (the default) is off.
    cors_origins: str = ""
    # Signs in to /dashboard seeing every key's tasks; unset, only API keys sign in (each its own tasks).
    admin_token: SecretStr | None = None

    # Retry backoff: full jitter over base * 2**(attempt-1), capped; never below Retry-After.
    retry_base_s: float = Field(1.0, ge=0)
    retry_max_s: float = Field(300.0, ge=0)
    # Redis redelivers an unacknowledged message after this long; every time limit and
    # countdown must stay below it or a running task would be delivered twice.
    visibility_timeout_s: int = Field(3600, gt=0)
    # Hard limit of one Celery task run (one upstream attempt, downloads included).
    task_time_limit_s: int = Field(900, gt=0)

    # A claimed attempt is owned for lease_s, extended every lease_s / 3 while its calls run; a
    # worker that stops extending (killed, frozen) loses the task to the sweeper.
    lease_s: float = Field(60.0, gt=0)
    # The sweeper's period, and how overdue a pending task must be before its message counts as lost.
    sweep_interval_s: float = Field(5.0, gt=0)
    republish_after_s: float = Field(30.0, gt=0)
    # A task not ended this long after it was accepted fails with `deadline_exceeded`.
    task_deadline_s: float = Field(3600.0, gt=0)
    # Attempts of any kind (retries, fallbacks, lost workers) before a task fails `attempts_exhausted`.
    max_attempts: int = Field(10, ge=1)
    # On SIGTERM a worker stops taking tasks and lets running ones finish for this long; what is left
    # goes back to the queue (its lease expires and the sweeper republishes it).
    shutdown_grace_s: float = Field(30.0, ge=0)
    # A worker with free slots that has received nothing for this long while messages wait in its
    # queues has lost its broker consumer: it exits (status 3) for its supervisor to restart it.
    consumer_stall_s: float = Field(60.0, gt=0)
    # Worker processes one `imagegate worker` runs (`--processes` overrides it); 0: one per CPU core.
    worker_processes: int = Field(0, ge=0)

    # Per-model upstream limits (`max_concurrency`, `rpm` in the providers file) are kept in this
    # Redis, shared by every worker; unset: the broker's when it is Redis, else each worker process
    # keeps them alone. A task with no room asks again after about model_wait_s (longer further back
    # in its model's line); a 429 halves its model's rate for model_cooldown_s.
    model_limits_url: str | None = None
    model_wait_s: float = Field(1.0, gt=0)
    model_cooldown_s: float = Field(60.0, gt=0)

    # Webhooks: private callback URLs are refused unless this is set (private deployments, tests);
    # the retry schedule in seconds after each failed delivery (comma-separated).
    webhook_allow_private: bool = False
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,86400"
    webhook_timeout_s: float = Field(15.0, gt=0)
    # Deliveries run in a lane of their own in each worker process, beside the Celery slots: this
    # many at once, at most max_pending_per_key of them for one API key; the rest wait in the outbox.
    webhook_concurrency: int = Field(32, ge=1)
    webhook_max_pending_per_key: int = Field(8, ge=1)
    # POST /v1/webhooks/deliveries/{id}/redeliver per API key (a `limits` rate string).
    redeliver_rate: str = "30/minute"
    # Most requests in one batch, and how long an Idempotency-Key is remembered.
    max_batch: int = Field(10_000, ge=1)
    max_batch_bytes: int = Field(100 * 1024 * 1024, gt=0)
    idempotency_ttl_s: float = Field(86_400.0, gt=0)

    # Largest image downloaded from an upstream URL, and the total time allowed for it.
    max_download_bytes: int = Field(50 * 1024 * 1024, gt=0)
    download_timeout_s: float = Field(60.0, gt=0)

    # Logs: `json` (one event per line), `text` (for a person), or `auto`: text on a terminal, else JSON.
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # The embedded mode (`imagegate up`): SQLite file + filesystem broker under data_dir.
    embedded: bool = False
    data_dir: Path | None = None

    # Where image bytes live (app/image_store.py): `postgres` in the images table (SQLite's in the
    # embedded mode), `dir` in files under image_dir (default: `images` under data_dir), `s3` in an
    # S3-compatible bucket. Credentials for S3 come as boto3 finds them (AWS_ACCESS_KEY_ID, ...).
    image_store: Literal["postgres", "dir", "s3"] = "postgres"
    image_dir: Path | None = None
    s3_endpoint_url: str | None = None  # unset: AWS itself
    s3_bucket: str | None = None
    s3_prefix: str = ""  # prepended to every object key, such as "imagegate/"
    s3_region: str | None = None  # unset: AWS_DEFAULT_REGION / AWS_REGION, as boto3 reads them
    # `response_format: url` answers with the gateway's signed URLs (`gateway`), or with the bucket's
    # presigned URLs (`store`, IMAGEGATE_IMAGE_STORE=s3 only), both valid for image_url_ttl_s.
    image_urls: Literal["gateway", "store"] = "gateway"
    # The sweeper deletes the image bytes of tasks ended longer ago than this (0 keeps them forever),
    # at most image_retention_batch tasks per pass.
    image_retention_s: int = Field(7 * 86_400, ge=0)
    image_retention_batch: int = Field(100, ge=1)

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule_parses(cls, text: str) -> str:
        parse_retry_schedule(text)  # a bad schedule stops start-up, not the first failed delivery
        return text

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @property
    def webhook_retry_delays_s(self) -> list[float]:
        return parse_retry_schedule(self.webhook_retry_schedule)

    def check(self) -> Settings:
        """Refuse settings a server must not run with. Returns self for chaining."""
        if not self.embedded and self.secret_key in ("", DEFAULT_SECRET_KEY):
            raise SettingsError(
                "IMAGEGATE_SECRET_KEY is unset or the default placeholder; set a long random value "
                "(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if self.task_time_limit_s >= self.visibility_timeout_s:
            raise SettingsError("IMAGEGATE_TASK_TIME_LIMIT_S must be below IMAGEGATE_VISIBILITY_TIMEOUT_S")
        if self.retry_max_s >= self.visibility_timeout_s:
            raise SettingsError("IMAGEGATE_RETRY_MAX_S must be below IMAGEGATE_VISIBILITY_TIMEOUT_S")
        if self.lease_s >= self.visibility_timeout_s:
            raise SettingsError("IMAGEGATE_LEASE_S must be below IMAGEGATE_VISIBILITY_TIMEOUT_S")
        try:
            from limits import parse

            parse(self.redeliver_rate)
        except ValueError:
            raise SettingsError("IMAGEGATE_REDELIVER_RATE must be like '30/minute' or '5 per second'") from None
        if self.image_urls == "store" and self.image_store != "s3":
            raise SettingsError("IMAGEGATE_IMAGE_URLS=store needs IMAGEGATE_IMAGE_STORE=s3")
        if self.image_store == "s3" and not self.s3_bucket:
            raise SettingsError("IMAGEGATE_IMAGE_STORE=s3 needs IMAGEGATE_S3_BUCKET")
        if self.image_store == "dir" and self.image_dir is None and self.data_dir is None:
            raise SettingsError("IMAGEGATE_IMAGE_STORE=dir needs IMAGEGATE_IMAGE_DIR")
        if self.image_urls == "store" and self.image_url_ttl_s > 7 * 86_400:
            raise SettingsError("IMAGEGATE_IMAGE_URL_TTL_S must be at most 604800 (7 days) with S3 presigned URLs")
        if self.uses_amqp and self.redis_url is None:
            raise SettingsError(
                "IMAGEGATE_BROKER_URL is RabbitMQ (amqp://): set IMAGEGATE_REDIS_URL too, such as "
                "redis://127.0.0.1:6379/0 (synchronous requests are woken and rate limits shared through Redis)"
            )
        if self.uses_filesystem and self.data_dir is None:
            raise SettingsError("a filesystem:// broker needs IMAGEGATE_DATA_DIR")
        return self

    @property
    def uses_redis(self) -> bool:
        return is_redis_url(self.broker_url)

    @property
    def uses_amqp(self) -> bool:
        return is_amqp_url(self.broker_url)

    @property
    def uses_filesystem(self) -> bool:
        """The embedded mode's broker: kombu's filesystem transport, under data_dir."""
        return self.broker_url.startswith("filesystem://")

    @property
    def shared_redis_url(self) -> str | None:
        """The Redis carrying wake-ups and shared counters: IMAGEGATE_REDIS_URL, else a Redis
        broker's; None without Redis (the embedded mode)."""
        return self.redis_url or (self.broker_url if self.uses_redis else None)

    @property
    def shared_limits_url(self) -> str | None:
        """The Redis keeping the per-model upstream limits for every worker; None: per process."""
        return self.model_limits_url or self.shared_redis_url
