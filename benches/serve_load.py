#!/usr/bin/env python3
"""`rlvr serve` under load: the latency of a short request alone and beside 16 clients.

Starts `rlvr serve --model MODEL --max-tokens LONG`, then
1. sends the short request (a /v1/completions prompt, `SHORT` new tokens, greedy) `REPEATS`
   times, one at a time: its unloaded latency;
2. runs 16 clients for `DURATION` seconds: one streams requests of `LONG` new tokens (it
   leaves its stream when the time is up, so the server stops its row), the other 15 loop,
   8 the short request and 7 a medium one (`MEDIUM` new tokens);
and prints one JSON line: the unloaded and loaded latencies of the short request (median,
99th percentile, count), the ratio of the loaded p99 to the unloaded median, the aggregate
completion tokens per second of the loaded phase (every finished request's `usage`, plus the
long stream's tokens, one per chunk), the server's peak RSS (`VmHWM`) and the load average
before and after.

Standard library only (asyncio and raw HTTP/1.1), so that the client costs the server as
little CPU as possible. Usage:

    benches/serve_load.py [--rlvr BIN] [--model gemma-3-270m] [--duration 180] ...
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "The patient is a 45-year-old man with chest pain. The most likely diagnosis is"
LONG_PROMPT = "Write a long story about a doctor who travels across the country.\n\nOnce upon a time"


def percentile(values, q):
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


async def post(host, port, path, body):
    """POSTs `body` as JSON and returns the status and the parsed JSON reply."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(payload)


async def stream_until(host, port, body, deadline, counter):
    """Streams one request, counting its chunks into `counter[0]`, and leaves at
    `deadline`; returns whether it ended before."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
    )
    await writer.drain()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=left)
            except asyncio.TimeoutError:
                return False
            if not line:
                return True
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    counter[0] += 1
    finally:
        writer.close()


def request(max_tokens, prompt=PROMPT, seed=0):
    return {"model": "served", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "seed": seed}


async def timed(host, port, body):
    started = time.monotonic()
    status, reply = await post(host, port, "/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {reply}")
    return time.monotonic() - started, reply["usage"]["completion_tokens"]


async def run(args, host, port):
    # warm-up, then the short request alone
    await timed(host, port, request(args.short))
    alone = []
    for _ in range(args.repeats):
        seconds, _ = await timed(host, port, request(args.short))
        alone.append(seconds)

    deadline = time.monotonic() + args.duration
    loaded, tokens, long_tokens, long_requests = [], [0], [0], [0]

    async def looping(client):
        # half the clients loop the short request, the other half the medium one
        short = client % 2 == 0
        turn = 0
        while time.monotonic() < deadline:
            body = request(args.short if short else args.medium, seed=turn)
            seconds, n = await timed(host, port, body)
            if time.monotonic() <= deadline:
                tokens[0] += n
                if short:
                    loaded.append(seconds)
            turn += 1

    async def long_client():
        while time.monotonic() < deadline:
            body = request(args.long, prompt=LONG_PROMPT, seed=long_requests[0])
            body["temperature"] = 1.0
            body["stream"] = True
            long_requests[0] += 1
            await stream_until(host, port, body, deadline, long_tokens)

    started = time.monotonic()
    await asyncio.gather(long_client(), *(looping(c) for c in range(args.clients - 1)))
    window = min(time.monotonic(), deadline) - started
    return alone, loaded, (tokens[0] + long_tokens[0]) / window, long_tokens[0], long_requests[0]


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rlvr", default=os.environ.get("RLVR_BIN", "rlvr"))
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--duration", type=float, default=180)
    parser.add_argument("--short", type=int, default=16)
    parser.add_argument("--medium", type=int, default=128)
    parser.add_argument("--long", type=int, default=4096)
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="another argument for `rlvr serve` (repeatable)")
    args = parser.parse_args()

    command = [args.rlvr, "serve", "--model", args.model, "--port", "0",
               "--served-model-name", "served", "--max-tokens", str(args.long), *args.serve_arg]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        first = server.stdout.readline()
        if not first.startswith("listening on "):
            sys.exit(f"rlvr serve did not start: {first!r}")
        url = first.split()[2]
        host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
        load_before = os.getloadavg()
        alone, loaded, tokens_per_s, long_tokens, long_requests = asyncio.run(
            run(args, host, int(port)))
        load_after = os.getloadavg()
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait()
    unloaded_p50 = statistics.median(alone)
    loaded_p99 = percentile(loaded, 99)
    print(json.dumps({
        "model": args.model,
        "clients": args.clients,
        "short_tokens": args.short, "medium_tokens": args.medium, "long_tokens": args.long,
        "duration_s": args.duration,
        "unloaded": {"n": len(alone), "p50_s": round(unloaded_p50, 3),
                     "p99_s": round(percentile(alone, 99), 3)},
        "loaded": {"n": len(loaded), "p50_s": round(percentile(loaded, 50), 3),
                   "p99_s": round(loaded_p99, 3)},
        "p99_over_unloaded": round(loaded_p99 / unloaded_p50, 2),
        "aggregate_tokens_per_s": round(tokens_per_s, 1),
        "long_stream_tokens": long_tokens, "long_requests": long_requests,
        "server_peak_rss_mib": round(rss, 1) if rss else None,
        "loadavg_before": load_before[0], "loadavg_after": load_after[0],
    }))


if __name__ == "__main__":
    main()
