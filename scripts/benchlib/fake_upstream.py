"""A cheap fake upstream speaking the OpenAI Images protocol, in its own process.

POST /v1/images/generations sleeps `latency_s`, then answers one pre-encoded reply: a real PNG of
random pixels (so it decodes and does not compress) as `b64_json`. It counts calls, the calls in
flight and their peak. Control: GET /_stats, POST /_reset, POST /_config {"latency_s": ...}.

    python -m benchlib.fake_upstream --port 9000 --latency-s 1 --image-kb 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import time

from aiohttp import web


def random_png(b64_kb: int) -> bytes:
    """A PNG whose base64 is about `b64_kb` KB: random RGB pixels, stored without compression gain."""
    from PIL import Image

    raw_bytes = b64_kb * 1024 * 3 // 4
    side = max(8, int(math.sqrt(raw_bytes / 3)))
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Upstream:
    def __init__(self, latency_s: float, image_kb: int):
        self.latency_s = latency_s
        png = random_png(image_kb)
        self.reply = json.dumps(
            {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}]}
        ).encode()
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first_call_at: float | None = None
        self.last_reply_at: float | None = None

    async def generate(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        if self.first_call_at is None:
            self.first_call_at = time.time()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        self.last_reply_at = time.time()
        return web.Response(body=self.reply, content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "calls": self.calls,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "latency_s": self.latency_s,
                "first_call_at": self.first_call_at,
                "last_reply_at": self.last_reply_at,
                "reply_bytes": len(self.reply),
            }
        )

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.reset()
        return await self.stats(request)

    async def configure(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "latency_s" in body:
            self.latency_s = float(body["latency_s"])
        return await self.stats(request)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-s", type=float, default=1.0)
    parser.add_argument("--image-kb", type=int, default=200)
    args = parser.parse_args()
    upstream = Upstream(args.latency_s, args.image_kb)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/images/generations", upstream.generate)
    app.router.add_get("/_stats", upstream.stats)
    app.router.add_post("/_reset", upstream.reset_stats)
    app.router.add_post("/_config", upstream.configure)
    web.run_app(app, host="127.0.0.1", port=args.port, backlog=4096, access_log=None, print=None)


if __name__ == "__main__":
    main()
