"""`imagegate batch` through the real command against a real API server and Celery worker (the
built-in `local` model): submit a JSONL file, follow it, download the images, survive a SIGKILL."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.support.fake_upstream import Step
from tests.support.processes import IMAGEGATE
from tests.support.services import wait_until

STATE_FILE = ".imagegate-batch.json"


def batch_cli(args: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*IMAGEGATE, "batch", *map(str, args)], env=env, check=False, capture_output=True, text=True, timeout=300
    )


def submit_args(file: Path, out: Path, api_url: str, api_key: str, *extra) -> list:
    return ["submit", file, "--url", api_url, "--key", api_key, "--out", out, "--wait", *extra]


def write_requests(path: Path, custom_ids: list[str], size: str = "64x64", openai_format: bool = False) -> Path:
    with path.open("w") as handle:
        for custom_id in custom_ids:
            line = {"custom_id": custom_id, "body": {"model": "local", "prompt": f"a kite {custom_id}", "size": size}}
            if openai_format:  # an OpenAI Batch API line: method and url are dropped by the client
                line |= {"method": "POST", "url": "/v1/images/generations"}
            handle.write(json.dumps(line) + "\n")
    return path


def count_batches(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM batches")).scalar_one()
    finally:
        engine.dispose()


def files_in(out: Path) -> set[str]:
    return {path.name for path in out.iterdir()}


@pytest.mark.e2e
def test_submit_wait_downloads_one_png_per_line_named_by_custom_id(tmp_path, api_url, api_key, worker, env):
    ids = [f"kite:{index:02d}" for index in range(30)]  # ':' is not kept in file names
    file = write_requests(tmp_path / "kites.jsonl", ids, openai_format=True)
    out = tmp_path / "out"

    result = batch_cli(submit_args(file, out, api_url, api_key), env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeed: 30" in result.stdout and "failed: 0" in result.stdout
    expected = {f"kite_{index:02d}.png" for index in range(30)}
    assert files_in(out) == expected | {STATE_FILE}
    for name in expected:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.e2e
def test_a_killed_run_resumes_without_submitting_or_downloading_twice(
    tmp_path, api_url, api_key, worker, env, database_url
):
    ids = [f"shot {index:02d}" for index in range(60)]
    file = write_requests(tmp_path / "shots.jsonl", ids, size="256x256")
    out = tmp_path / "out"
    command = submit_args(file, out, api_url, api_key, "--chunk-size", 20)
    batches_before = count_batches(database_url)

    with (tmp_path / "first-run.log").open("w") as log:
        process = subprocess.Popen(
            [*IMAGEGATE, "batch", *map(str, command)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(
            lambda: process.poll() is not None or len(list(out.glob("*.png"))) >= 3,
            120,
            "the first images",
            interval_s=0.005,
        )
        assert process.poll() is None, "the run ended before it could be interrupted"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(list(out.glob("*.png"))) < 60
    first_ids = json.loads((out / STATE_FILE).read_text())["batches"]
    assert sorted(first_ids) == ["0", "1", "2"]

    result = batch_cli(command, env)

    assert result.returncode == 0, result.stdout + result.stderr
    expected = {f"shot_{index:02d}.png" for index in range(60)}
    assert files_in(out) == expected | {STATE_FILE}  # no "-2" duplicates, no temp files left
    assert json.loads((out / STATE_FILE).read_text())["batches"] == first_ids
    inodes = {name: (out / name).stat().st_ino for name in expected}

    # Even with the state file lost, the Idempotency-Keys answer the same three batches.
    (out / STATE_FILE).unlink()
    result = batch_cli(command, env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / STATE_FILE).read_text())["batches"] == first_ids
    assert {name: (out / name).stat().st_ino for name in expected} == inodes  # nothing downloaded again
    assert count_batches(database_url) - batches_before == 3
    for batch_id in first_ids.values():
        batch = httpx.get(
            f"{api_url}/v1/images/batches/{batch_id}", timeout=30, headers={"Authorization": f"Bearer {api_key}"}
        ).json()
        assert batch["total"] == 20 and batch["counts"]["succeed"] == 20 and batch["status"] == "completed"


def test_bad_lines_are_all_reported_and_nothing_is_submitted(tmp_path, env):
    file = tmp_path / "bad.jsonl"
    file.write_text(
        "\n".join(
            [
                json.dumps({"custom_id": "a", "body": {"model": "local", "prompt": "one"}}),
                json.dumps({"custom_id": "b", "body": {"model": "local", "prompt": "two"}}),
                '{"custom_id": "c", "body": ',  # line 3: not JSON
                json.dumps({"custom_id": "d", "body": {"model": "local", "prompt": "three"}}),
                json.dumps({"custom_id": "b", "body": {"model": "local", "prompt": "four"}}),  # line 5: duplicate
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"
    # A server that would notice any connection: there must be none.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"

        result = batch_cli(submit_args(file, out, url, "ig_unused"), env)

        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.findall(r"line (\d+): ", result.stderr) == ["3", "5"]
    assert "'b'" in result.stderr and "line 1" in result.stderr  # line 5 repeats line 1's custom_id
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path, env):
    file = write_requests(tmp_path / "one.jsonl", ["only"])
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = batch_cli(submit_args(file, tmp_path / "out", f"http://127.0.0.1:{port}", "ig_unused"), env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_failed_line_exits_1_and_the_summary_names_it(tmp_path, api_url, api_key, worker, env, upstream):
    file = write_requests(tmp_path / "mixed.jsonl", ["fine-1", "fine-2"])
    refused = f"refused {uuid.uuid4().hex[:8]}"
    upstream.script(refused, Step(status=400, message="The upstream refused this prompt."))
    with file.open("a") as handle:  # accepted at intake, refused by the upstream when it runs
        handle.write(json.dumps({"custom_id": "refused", "body": {"model": "fake-dalle", "prompt": refused}}) + "\n")
    out = tmp_path / "out"

    result = batch_cli(submit_args(file, out, api_url, api_key), env)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "succeed: 2" in result.stdout and "failed: 1" in result.stdout
    failure = [line for line in result.stdout.splitlines() if "refused" in line]
    assert failure and "upstream_rejected" in failure[0]
    assert files_in(out) == {"fine-1.png", "fine-2.png", STATE_FILE}


@pytest.mark.e2e
def test_status_and_results_read_a_batch_with_url_and_key_from_the_environment(tmp_path, api_url, api_key, worker, env):
    ids = ["first", "second", "third"]
    file = write_requests(tmp_path / "three.jsonl", ids)
    env = env | {"IMAGEGATE_URL": api_url, "IMAGEGATE_KEY": api_key}

    submitted = batch_cli(["submit", file, "--out", tmp_path / "out"], env)  # no --wait: prints the id
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()

    def ended() -> dict | None:
        result = batch_cli(["status", batch_id, "--json"], env)
        assert result.returncode == 0, result.stderr
        batch = json.loads(result.stdout)
        return batch if batch["status"] == "completed" else None

    batch = wait_until(ended, 60, "the batch", interval_s=0.5)
    assert batch["id"] == batch_id and batch["total"] == 3 and batch["counts"]["succeed"] == 3
    summary = batch_cli(["status", batch_id], env)
    assert summary.returncode == 0 and batch_id in summary.stdout and "completed" in summary.stdout

    results = batch_cli(["results", batch_id], env)
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert [line["custom_id"] for line in lines] == ids  # in the order of the file
    assert all(line["task_status"] == "succeed" and line["data"][0]["url"].startswith("http") for line in lines)

    missing = batch_cli(["status", "00000000-0000-0000-0000-000000000000"], env)
    assert missing.returncode == 2 and "404" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.e2e
def test_lines_the_server_refuses_are_reported_by_their_line_in_the_file(tmp_path, api_url, api_key, worker, env):
    file = tmp_path / "unknown-model.jsonl"
    file.write_text(
        "\n".join(
            [
                json.dumps({"custom_id": "one", "body": {"model": "local", "prompt": "one"}}),
                "",  # a blank line: the server numbers the lines it was sent, the client says the file's
                json.dumps({"custom_id": "two", "body": {"model": "local", "prompt": "two"}}),
                json.dumps({"custom_id": "three", "body": {"model": "no-such-model", "prompt": "three"}}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"

    result = batch_cli(submit_args(file, out, api_url, api_key), env)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid_batch" in result.stderr and "Traceback" not in result.stderr
    assert re.findall(r"^line (\d+): ", result.stderr, re.MULTILINE) == ["4"]
    assert not (out / STATE_FILE).exists()


def write_lines(path: Path, lines: list[tuple[str, int]]) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {"custom_id": custom_id, "body": {"model": "local", "prompt": custom_id, "size": "64x64", "n": n}}
            )
            + "\n"
            for custom_id, n in lines
        )
    )
    return path


def test_custom_ids_whose_suffixed_file_names_clash_are_refused_before_anything_is_sent(tmp_path, env):
    # "dup" with n=2 saves dup-1 and dup-2: "dup-1" would save over (or be skipped as) the first.
    file = write_lines(tmp_path / "clash.jsonl", [("dup", 2), ("other", 1), ("dup-1", 1)])
    out = tmp_path / "out"
    with socket.socket() as server:  # notices any connection: there must be none
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        result = batch_cli(submit_args(file, out, f"http://127.0.0.1:{server.getsockname()[1]}", "ig_unused"), env)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.returncode == 2, result.stdout + result.stderr
    (problem,) = [line for line in result.stderr.splitlines() if re.search(r"line \d+: ", line)]
    assert "line 3: " in problem and "'dup-1'" in problem and "'dup'" in problem and "line 1" in problem
    assert "dup-1" in problem and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.e2e
def test_several_images_of_a_line_are_saved_with_suffixes_beside_other_lines(tmp_path, api_url, api_key, worker, env):
    file = write_lines(tmp_path / "many.jsonl", [("dup", 2), ("dup-3", 1), ("one", 1)])
    out = tmp_path / "out"

    result = batch_cli(submit_args(file, out, api_url, api_key), env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(out) == {"dup-1.png", "dup-2.png", "dup-3.png", "one.png", STATE_FILE}
