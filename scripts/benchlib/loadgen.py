"""Load: wrk (cheap, C) for closed-loop rows, and an aiohttp client in its own process for bursts
(N requests at once, each timed and checked for an image) and as a fallback when wrk is missing."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = __BODY__
wrk.headers["Content-Type"] = "application/json"
__AUTH__
done = function(summary, latency, requests)
  io.write(string.format('BENCHJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def closed_loop(
    url: str, body: dict, *, connections: int, duration_s: float, key: str | None = None, timeout_s: float = 120
) -> dict:
    """`connections` clients each sending one POST after another for `duration_s`. Returns
    requests, rps, non2xx, errors, p50_ms, p99_ms."""
    if have_wrk():
        return _wrk(url, body, connections=connections, duration_s=duration_s, key=key, timeout_s=timeout_s)
    command = [
        sys.executable,
        "-m",
        "benchlib.loadgen",
        "closed",
        url,
        json.dumps(body),
        "--connections",
        str(connections),
        "--duration-s",
        str(duration_s),
        "--timeout-s",
        str(timeout_s),
    ]
    if key:
        command += ["--key", key]
    return _json_of(subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent))


def burst(url: str, body: dict, *, count: int, key: str | None = None, timeout_s: float = 120) -> dict:
    """`count` POSTs sent at once. Returns answered (with an image), statuses, p50_ms, p99_ms."""
    command = [
        sys.executable,
        "-m",
        "benchlib.loadgen",
        "burst",
        url,
        json.dumps(body),
        "--count",
        str(count),
        "--timeout-s",
        str(timeout_s),
    ]
    if key:
        command += ["--key", key]
    return _json_of(subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent))


def _json_of(done: subprocess.CompletedProcess) -> dict:
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON ") :])
    raise RuntimeError(f"load generator failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")


def _wrk(url, body, *, connections, duration_s, key, timeout_s) -> dict:
    script = WRK_SCRIPT.replace("__BODY__", _lua_string(json.dumps(body)))
    script = script.replace("__AUTH__", f'wrk.headers["Authorization"] = "Bearer {key}"' if key else "")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    threads = max(1, min(2, connections))
    done = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration_s:g}s",
            "--timeout",
            f"{timeout_s:g}s",
            "-s",
            lua.name,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration_s + timeout_s + 30,
    )
    Path(lua.name).unlink()
    raw = _json_of(done)
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "non2xx": raw["non2xx"],
        "errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "tool": "wrk",
    }


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _has_image(payload: bytes) -> bool:
    try:
        data = json.loads(payload).get("data") or []
    except ValueError:
        return False
    return bool(data) and bool(data[0].get("b64_json") or data[0].get("url"))


async def _one(session, url, body, headers, timeout):
    import aiohttp

    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as reply:
            payload = await reply.read()
            return reply.status, time.perf_counter() - started, reply.status == 200 and _has_image(payload)
    except (TimeoutError, aiohttp.ClientError) as error:
        return type(error).__name__, time.perf_counter() - started, False


def _session(timeout_s: float):
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def _burst(url, body, count, headers, timeout_s) -> dict:
    import aiohttp

    async with _session(timeout_s) as session:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        results = await asyncio.gather(*[_one(session, url, body, headers, timeout) for _ in range(count)])
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    answered = [seconds for _, seconds, ok in results if ok]
    return {
        "count": count,
        "answered": len(answered),
        "statuses": statuses,
        "p50_ms": _percentile(answered, 0.5) * 1000,
        "p99_ms": _percentile(answered, 0.99) * 1000,
        "max_ms": max((s for _, s, _ in results), default=0) * 1000,
    }


async def _closed(url, body, connections, duration_s, headers, timeout_s) -> dict:
    import aiohttp

    latencies: list[float] = []
    non2xx = errors = 0
    deadline = time.perf_counter() + duration_s

    async def client(session):
        nonlocal non2xx, errors
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        while time.perf_counter() < deadline:
            status, seconds, _ = await _one(session, url, body, headers, timeout)
            if isinstance(status, str):
                errors += 1
            elif status >= 300:
                non2xx += 1
            latencies.append(seconds)

    started, cpu_started = time.perf_counter(), time.process_time()
    async with _session(timeout_s) as session:
        await asyncio.gather(*[client(session) for _ in range(connections)])
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        # The load client shares the machine: when it is near a whole core, it is what limits req/s.
        "client CPU ms/req": (time.process_time() - cpu_started) * 1000 / max(len(latencies), 1),
        "non2xx": non2xx,
        "errors": errors,
        "p50_ms": _percentile(latencies, 0.5) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "tool": "aiohttp",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["burst", "closed"])
    parser.add_argument("url")
    parser.add_argument("body")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10)
    parser.add_argument("--timeout-s", type=float, default=120)
    parser.add_argument("--key")
    args = parser.parse_args()
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    body = args.body.encode()
    if args.mode == "burst":
        result = asyncio.run(_burst(args.url, body, args.count, headers, args.timeout_s))
    else:
        result = asyncio.run(_closed(args.url, body, args.connections, args.duration_s, headers, args.timeout_s))
    print("BENCHJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
