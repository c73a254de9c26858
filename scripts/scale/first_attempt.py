#!/usr/bin/env python3
"""Time from a message's 250 to its first delivery attempt (part of scripts/bench-scale).

Runs, in one asyncio loop (one clock): a small SMTP sink on 127.0.0.1:--sink-port that
erlmail relays to (it notes when each connection arrives and when each MAIL FROM
arrives), and a client that sends --count messages to erlmail on 127.0.0.1:--smtp-port one
at a time over one session, each with its own sender `mN@x.test`, waiting until the sink
has the message (plus --gap seconds) before sending the next. Prints one JSON object:
the per-message lags (sink MAIL FROM time - client 250 time, and sink connect time -
250), their medians and p90s, in milliseconds. Loopback only.

    first_attempt.py --smtp-port 2525 --sink-port 2626 [--count 50] [--gap 0.05]
"""

import argparse
import asyncio
import json
import re
import statistics
import sys
import time

now = time.perf_counter

MAIL_RE = re.compile(rb"^MAIL FROM:\s*<([^>]*)>", re.I)


class Sink:
    def __init__(self):
        self.mail_at = {}      # sender -> time MAIL FROM arrived
        self.conn_at = {}      # sender -> time its connection was accepted
        self.events = {}       # sender -> asyncio.Event

    def event(self, sender):
        return self.events.setdefault(sender, asyncio.Event())

    async def handle(self, reader, writer):
        t_conn = now()
        writer.write(b"220 sink.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                cmd = line[:4].upper()
                if cmd in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink.test\r\n250 8BITMIME\r\n")
                elif cmd == b"MAIL":
                    t = now()
                    m = MAIL_RE.match(line)
                    sender = m.group(1).decode(errors="replace") if m else ""
                    self.mail_at.setdefault(sender, t)
                    self.conn_at.setdefault(sender, t_conn)
                    self.event(sender).set()
                    writer.write(b"250 2.1.0 ok\r\n")
                elif cmd == b"RCPT":
                    writer.write(b"250 2.1.5 ok\r\n")
                elif cmd == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    while True:
                        l2 = await reader.readline()
                        if not l2 or l2 == b".\r\n":
                            break
                    writer.write(b"250 2.0.0 queued\r\n")
                elif cmd == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:  # RSET, NOOP, anything else
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def reply(reader):
    """Read one (multi-line) reply; returns (code, last line) and the time it ended."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("erlmail closed the session")
        if line[3:4] != b"-":
            return int(line[:3]), line, now()


async def expect(reader, code):
    c, line, t = await asyncio.wait_for(reply(reader), 30)
    if c != code:
        raise RuntimeError(f"expected {code}, got {line!r}")
    return t


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smtp-port", type=int, required=True)
    ap.add_argument("--sink-port", type=int, required=True)
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--gap", type=float, default=0.05)
    a = ap.parse_args()

    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", a.sink_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", a.smtp_port)
    await expect(reader, 220)
    writer.write(b"EHLO probe.test\r\n")
    await expect(reader, 250)
    lag_mail, lag_conn, missing = [], [], 0
    body = b"From: a@x.test\r\nTo: b@remote.test\r\nSubject: probe\r\n\r\n" + b"x" * 200 + b"\r\n"
    for i in range(a.count):
        sender = f"m{i}@x.test"
        for cmd, code in ((f"MAIL FROM:<{sender}>", 250), ("RCPT TO:<b@remote.test>", 250),
                          ("DATA", 354)):
            writer.write(cmd.encode() + b"\r\n")
            await expect(reader, code)
        writer.write(body + b".\r\n")
        t250 = await expect(reader, 250)
        try:
            await asyncio.wait_for(sink.event(sender).wait(), 10)
            lag_mail.append((sink.mail_at[sender] - t250) * 1e3)
            lag_conn.append((sink.conn_at[sender] - t250) * 1e3)
        except asyncio.TimeoutError:
            missing += 1
        await asyncio.sleep(a.gap)
    writer.write(b"QUIT\r\n")
    writer.close()
    server.close()

    def p90(v):
        return sorted(v)[max(0, int(0.9 * len(v) + 0.999) - 1)] if v else None

    print(json.dumps({
        "count": a.count,
        "missing": missing,
        "mail_median_ms": statistics.median(lag_mail) if lag_mail else None,
        "mail_p90_ms": p90(lag_mail),
        "conn_median_ms": statistics.median(lag_conn) if lag_conn else None,
        "mail_lags_ms": [round(x, 3) for x in lag_mail],
    }))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # reported to the driving script
        print(json.dumps({"error": repr(e)}))
        sys.exit(1)
