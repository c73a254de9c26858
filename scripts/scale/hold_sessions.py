#!/usr/bin/env python3
"""Open N idle SMTP sessions to 127.0.0.1:PORT and hold them (part of scripts/bench-scale).

Each session reads the greeting, sends EHLO and reads the whole reply, then stays idle.
When all are up the program prints one line `READY <held> <failed> <seconds>` on stdout
and holds them until its standard input closes (or --hold seconds pass), then closes them
and exits. Connects at most --parallel handshakes at once so the listen backlog is not
overrun. Loopback only.

    hold_sessions.py --port 2525 --count 10000 [--parallel 200] [--hold 120]
"""

import argparse
import asyncio
import resource
import sys
import time


async def one(port, sem, held):
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 30)
        try:
            await asyncio.wait_for(read_reply(reader, b"220"), 30)
            writer.write(b"EHLO hold.test\r\n")
            await writer.drain()
            await asyncio.wait_for(read_reply(reader, b"250"), 30)
        except BaseException:
            writer.close()
            raise
        held.append(writer)


async def read_reply(reader, code):
    """Read a (multi-line) reply; the last line has a space after the code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if not line.startswith(code):
            raise ConnectionError(f"unexpected reply {line!r}")
        if line[3:4] == b" ":
            return


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--hold", type=float, default=120.0)
    a = ap.parse_args()
    want = a.count + 100
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    held, sem = [], asyncio.Semaphore(a.parallel)
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(a.port, sem, held) for _ in range(a.count)),
                                   return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"READY {len(held)} {len(failed)} {time.monotonic() - t0:.2f}", flush=True)
    if failed:
        print(f"first failure: {failed[0]!r}", file=sys.stderr)

    # Hold until the parent closes our stdin (or the bound passes).
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), a.hold)
    except asyncio.TimeoutError:
        pass
    for w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
