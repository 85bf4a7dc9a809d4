"""`imagegate batch`: submit a JSONL file of image requests as batches, follow them and download
the images. Re-running the same command after an interruption resumes: every chunk is sent with an
Idempotency-Key derived from the file's bytes, so the server answers the batch it already has."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from imagegate.client.api import EXTENSIONS, Api, ClientError, HttpError

STATE_FILE = ".imagegate-batch.json"
TEMP_PREFIX, TEMP_SUFFIX = ".imagegate-", ".part"
ENDED = ("completed", "cancelled")
ALL_EXTENSIONS = (*EXTENSIONS.values(), "bin")
POLL_S = 1.0
# Far above any n the server accepts: only keeps a wild n from costing time before the server refuses it.
MAX_NAMED_IMAGES = 100
DOWNLOAD_ATTEMPTS = 3  # per image, each with a freshly signed URL


@dataclass
class Line:
    number: int  # 1-based line number in the file, so messages point at the file
    custom_id: str
    body: dict


def safe_name(custom_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", custom_id)


def file_stem(custom_id: str, index: int, count: int) -> str:
    """The file name, less its extension, of image `index` (from 1) of `count` a line got."""
    return safe_name(custom_id) if count == 1 else f"{safe_name(custom_id)}-{index}"


def file_stems(custom_id: str, body: dict) -> list[str]:
    """Every name a line's images may be saved under: its n images, or one should the server give one."""
    n = body.get("n", 1)
    n = min(n, MAX_NAMED_IMAGES) if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    stems = [file_stem(custom_id, 1, 1)]
    if n > 1:
        stems += [file_stem(custom_id, index, n) for index in range(1, n + 1)]
    return stems


# --- reading the file -------------------------------------------------------------------------


def _check(item) -> str | None:
    if not isinstance(item, dict):
        return "not a JSON object"
    if not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
        return "custom_id must be a non-empty string"
    if not isinstance(item.get("body"), dict):
        return "body must be a JSON object"
    # OpenAI Batch API lines are accepted, but only for the endpoint this gateway serves.
    if "url" in item and not str(item["url"]).rstrip("/").endswith("/images/generations"):
        return f"url {item['url']!r} is not /v1/images/generations"
    return None


def read_requests(path: Path) -> tuple[str, list[Line], list[str]]:
    """The file's sha256, its requests, and one message per bad line (all of them, not the first)."""
    data = path.read_bytes()
    lines: list[Line] = []
    problems: list[str] = []
    ids: dict[str, int] = {}
    names: dict[str, Line] = {}  # file stem -> the line whose images may be saved under it
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as exc:  # bad UTF-8 is a ValueError too
            problems.append(f"line {number}: not JSON ({exc})")
            continue
        problem = _check(item)
        stems = file_stems(item["custom_id"], item["body"]) if problem is None else []
        if problem is None and item["custom_id"] in ids:
            problem = f"custom_id {item['custom_id']!r} is already used on line {ids[item['custom_id']]}"
        elif clash := next((stem for stem in stems if stem in names), None):
            # One image would overwrite the other, or be taken for it and skipped: refused before
            # anything is sent. Ids that sanitise alike clash so, as do "a" with n=2 (a-1, a-2) and "a-1".
            other = names[clash]
            problem = (
                f"custom_id {item['custom_id']!r} and custom_id {other.custom_id!r} (line {other.number}) "
                f"would both save images as {clash}.*"
            )
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        line = Line(number, item["custom_id"], item["body"])
        ids[line.custom_id] = number
        names |= dict.fromkeys(stems, line)
        lines.append(line)
    if not lines and not problems:
        problems.append("no requests in the file")
    return hashlib.sha256(data).hexdigest(), lines, problems


# --- submitting ---------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """A killed process leaves the old file or the new one, never half of one."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_state(out: Path, digest: str, chunk_size: int) -> dict:
    path = out / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"file_sha256": digest, "chunk_size": chunk_size, "batches": {}}
    except ValueError:
        raise ClientError(f"{path} is unreadable; delete it and re-run (nothing is submitted twice)") from None
    if state.get("file_sha256") != digest:
        # Images are named by custom_id: mixing two files' downloads would skip or mix images.
        raise ClientError(f"{out} holds the batches of another file; choose another --out")
    if state.get("chunk_size") != chunk_size:
        print(f"imagegate: resuming with --chunk-size {state['chunk_size']} recorded in {path}", file=sys.stderr)
    return state


def chunk_body(lines: list[Line]) -> bytes:
    # Deterministic for the same file, as the idempotency key requires the same body. ASCII only:
    # a raw U+2028 inside a string is valid JSON but splits the line for some JSONL readers.
    return "".join(
        json.dumps({"custom_id": line.custom_id, "body": line.body}, separators=(",", ":")) + "\n" for line in lines
    ).encode()


def submit_chunk(api: Api, lines: list[Line], key: str) -> str:
    try:
        return api.submit(chunk_body(lines), key)["id"]
    except HttpError as exc:
        if exc.status == 422:  # the key is derived from the file's bytes and the chunk's index only
            raise ClientError(f"{exc} (was this file submitted before with another --chunk-size?)") from None
        if exc.error.get("code") != "invalid_batch":
            raise
        # The server numbers the chunk's lines; say which lines of the file they are.
        details = [
            f"line {lines[bad['line'] - 1].number}: {bad.get('param') or 'line'}: {bad.get('message')}"
            for bad in exc.error.get("lines") or []
            if 1 <= (bad.get("line") or 0) <= len(lines)
        ]
        raise ClientError("\n".join([str(exc), *details])) from None


def submit_all(api: Api, lines: list[Line], digest: str, out: Path, chunk_size: int) -> list[str]:
    state = load_state(out, digest, chunk_size)
    size = state["chunk_size"]
    ids = []
    for index, start in enumerate(range(0, len(lines), size)):
        batch_id = state["batches"].get(str(index))
        if batch_id is None:
            batch_id = submit_chunk(api, lines[start : start + size], f"imagegate-batch-{digest[:32]}-{index}")
            state["batches"][str(index)] = batch_id
            write_atomic(out / STATE_FILE, json.dumps(state, indent=2).encode())
        ids.append(batch_id)
    return ids


# --- following and downloading -----------------------------------------------------------------


@dataclass
class Saver:
    api: Api
    out: Path
    saved: set[str] = field(default_factory=set)  # custom_ids whose images are all on disk
    failed: dict[str, dict] = field(default_factory=dict)  # custom_id -> error
    attempts: dict[str, int] = field(default_factory=dict)

    def sync(self, batch_id: str) -> bool:
        """Download what succeeded and is not on disk yet; False if some image must be tried again."""
        complete = True
        for line in self.api.results(batch_id):  # fetched anew each time: the URLs expire
            custom_id = line["custom_id"]
            if line["task_status"] == "failed":
                self.failed[custom_id] = line.get("error") or {}
            elif line["task_status"] == "succeed" and custom_id not in self.saved:
                if self.save(custom_id, line.get("data") or []):
                    self.saved.add(custom_id)
                else:
                    complete = False
        return complete

    def save(self, custom_id: str, images: list[dict]) -> bool:
        complete = True
        for index, image in enumerate(images, start=1):
            stem = file_stem(custom_id, index, len(images))
            if any((self.out / f"{stem}.{ext}").exists() for ext in ALL_EXTENSIONS):
                continue  # done by an earlier run
            try:
                content, ext = self.api.download(image["url"])
            except (ClientError, httpx.HTTPError) as exc:
                self.attempts[stem] = self.attempts.get(stem, 0) + 1
                if self.attempts[stem] >= DOWNLOAD_ATTEMPTS:
                    raise ClientError(f"downloading the image of {custom_id!r}: {exc}") from None
                complete = False  # tried again next round, with a fresh URL
                continue
            write_atomic(self.out / f"{stem}.{ext}", content)
        return complete


def _ended(batch: dict) -> int:
    return batch["counts"]["succeed"] + batch["counts"]["failed"]


def follow(api: Api, ids: list[str], out: Path) -> int:
    for temp in out.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)  # what a killed run was writing
    saver = Saver(api, out)
    synced: dict[str, int] = {}  # batch id -> its ended count when all its images were last on disk
    columns = (
        TextColumn("images"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        bar = progress.add_task("images", total=None, counts="")
        while True:
            batches = [api.batch(batch_id) for batch_id in ids]
            for batch in batches:
                if synced.get(batch["id"]) != _ended(batch) and saver.sync(batch["id"]):
                    synced[batch["id"]] = _ended(batch)
            counts = {
                name: sum(b["counts"][name] for b in batches) for name in ("pending", "running", "succeed", "failed")
            }
            progress.update(
                bar,
                total=sum(b["total"] for b in batches),
                completed=counts["succeed"] + counts["failed"],
                counts=" ".join(f"{k} {v}" for k, v in counts.items()) + f" saved {len(saver.saved)}",
            )
            if all(b["status"] in ENDED and synced.get(b["id"]) == _ended(b) for b in batches):
                break
            time.sleep(POLL_S)
    return summarise(batches, saver.failed)


def summarise(batches: list[dict], failed: dict[str, dict]) -> int:
    succeed = sum(b["counts"]["succeed"] for b in batches)
    not_run = sum(b["total"] - _ended(b) for b in batches)  # lines of a cancelled batch
    print(f"succeed: {succeed}  failed: {len(failed)}" + (f"  not run: {not_run}" if not_run else ""))
    for custom_id, error in failed.items():
        print(f"  {custom_id}: {error.get('code')}: {error.get('message')}")
    return 1 if failed or not_run else 0


# --- the commands (called by app/commands/batch.py) ---------------------------------------------


def _command(func):
    """Errors as one line on stderr and exit 2, never a traceback."""

    def run(*args, **kwargs) -> int:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
        try:
            return func(*args, **kwargs)
        except (ClientError, OSError) as exc:
            print(f"imagegate: {exc}", file=sys.stderr)
            return 2
        except httpx.HTTPError as exc:  # could not connect, timed out, connection dropped
            print(
                f"imagegate: {exc.request.method} {exc.request.url} failed: {exc or type(exc).__name__}",
                file=sys.stderr,
            )
            return 2
        except (KeyError, TypeError, ValueError) as exc:  # an answer not as the API documents it
            print(f"imagegate: unexpected answer from the server ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("imagegate: interrupted", file=sys.stderr)
            return 130

    return run


@_command
def submit(file: Path, url: str, key: str, out: Path, wait: bool, chunk_size: int) -> int:
    digest, lines, problems = read_requests(file)
    if problems:
        for problem in problems:
            print(f"{file}: {problem}", file=sys.stderr)
        print("imagegate: nothing submitted", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    api = Api(url, key)
    ids = submit_all(api, lines, digest, out, chunk_size)
    if not wait:
        print("\n".join(ids))
        return 0
    return follow(api, ids, out)


@_command
def status(batch_id: str, url: str, key: str, as_json: bool) -> int:
    batch = Api(url, key).batch(batch_id)
    if as_json:
        print(json.dumps(batch, indent=2))
        return 0
    counts = batch["counts"]
    print(f"batch {batch['id']}: {batch['status']}")
    print(
        f"  {batch['total']} requests: "
        + ", ".join(f"{counts[name]} {name}" for name in ("pending", "running", "succeed", "failed"))
    )
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch["created"]))
    took = f", finished after {batch['finished'] - batch['created']} s" if batch.get("finished") else ""
    print(f"  created {when}{took}")
    if batch.get("metadata"):
        print(f"  metadata: {json.dumps(batch['metadata'])}")
    if batch.get("callback_url"):
        print(f"  callback_url: {batch['callback_url']}")
    return 0


@_command
def results(batch_id: str, url: str, key: str) -> int:
    Api(url, key).stream_results(batch_id, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0
