"""CPU per request of the ways the gateway could call slurmrestd, side by side.

A stub HTTP/1.1 server in a child process answers every request at once with
a slurmrestd-sized JSON body; each client posts a job-sized body through it,
``--concurrency`` at a time, and the CPU time of this process is divided by
the number of requests. The baseline is aiohttp used directly.

    python bench/transport.py [--requests 4000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.transport import AiohttpTransport, Outbound

BODY = b'{"job_id": 123, "step_id": "batch", "errors": [], "warnings": []}' * 6
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    + BODY
)
JOB = b'{"script": "' + b"x" * 2000 + b'", "job": {"name": "bench"}}'
HEADERS = {"X-SLURM-USER-TOKEN": "t" * 120, "X-SLURM-USER-NAME": "gwuser"}


class _Stub(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:end].lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(ANSWER)  # type: ignore[attr-defined]


def serve(sock: socket.socket) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Stub, sock=sock)
        await server.serve_forever()

    uvloop.run(main())


async def measure(name: str, one: Callable[[], Awaitable[None]], args: argparse.Namespace) -> float:
    for _ in range(100):
        await one()
    todo = iter(range(args.requests))

    async def worker() -> None:
        for _ in todo:
            await one()

    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - wall
    per: float = (time.process_time() - cpu) / args.requests * 1e6
    print(f"  {name:44} {per:6.0f} us CPU/request  {args.requests / wall:6.0f} req/s")
    return per


async def run(url: str, args: argparse.Namespace) -> None:
    path = "/slurm/v0.0.42/job/submit"
    results: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:

        async def raw() -> None:
            async with session.post(url + path, data=JOB, headers=HEADERS) as r:
                await r.read()

        results["aiohttp"] = await measure("aiohttp, directly (baseline)", raw, args)

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(limits=limits) as client:

        async def default() -> None:
            (await client.post(url + path, content=JOB, headers=HEADERS)).read()

        results["httpx"] = await measure("httpx.AsyncClient, its own pool", default, args)

    async with httpx.AsyncClient(transport=AiohttpTransport(32)) as client:

        async def layered() -> None:
            (await client.post(url + path, content=JOB, headers=HEADERS)).read()

        results["layered"] = await measure("httpx.AsyncClient over AiohttpTransport", layered, args)

    outbound = Outbound(url, timeout=10, connect_timeout=3, max_connections=32)

    async def gateway() -> None:
        await outbound.request("POST", path, content=JOB, headers=HEADERS)

    results["gateway"] = await measure(
        "Outbound over AiohttpTransport (the gateway)", gateway, args
    )
    await outbound.aclose()
    base = results["aiohttp"]
    print("  ratios to aiohttp: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in results.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    sock = socket.create_server(("127.0.0.1", 0))
    stub = multiprocessing.Process(target=serve, args=(sock,), daemon=True)
    stub.start()
    try:
        port = sock.getsockname()[1]
        print(f"transport CPU, {args.requests} POSTs, {args.concurrency} concurrent, uvloop:")
        uvloop.run(run(f"http://127.0.0.1:{port}", args))
    finally:
        stub.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
