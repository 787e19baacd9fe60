#!/usr/bin/env python3
"""Fault campaign, part 3: server abuse.

Starts `rlvr serve` on the tiny Gemma 3 fixture and sends it COUNT (10,000 by default)
malformed or random requests from WORKERS threads (raw sockets: broken JSON, random bytes,
wrong types, out-of-range numbers, deep nesting, invalid UTF-8, token ids outside the
vocabulary, prompts beyond the context, wrong methods and paths, lying Content-Length
headers, and some small valid requests), while a normal client asks for the same greedy
completion every 0.2 s. It checks that the server never crashes (the process is alive at the
end), never hangs (every request is answered or closed within TIMEOUT seconds) and keeps
answering the normal client with the same text, and prints the figures in RELIABILITY.md.

Usage: tests/faults/abuse.py [COUNT] [WORKERS]   (RLVR=path/to/rlvr, default
$CARGO_TARGET_DIR/debug/rlvr, else target/debug/rlvr; SERVER_LOG=file keeps the server's
standard error). Run by hand, not in CI; the integration test
`serve::malformed_requests_never_stop_the_server` is its short variant. Standard library only.
"""

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
TIMEOUT = 30.0
SERVER_LOG = os.environ.get("SERVER_LOG", "/dev/null")
RLVR = os.environ.get("RLVR") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "rlvr"
)


def raw(address, data, timeout=TIMEOUT):
    """Sends bytes, closes the sending side, reads the reply: (status or None, seconds)."""
    started = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as s:
        s.settimeout(timeout)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on a bad request; its reply is still read
        reply = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
    elapsed = time.monotonic() - started
    if reply.startswith(b"HTTP/1."):
        return int(reply.split(b" ", 2)[1]), elapsed, reply
    return None, elapsed, reply


def request(method, path, body, headers=b"", length=None):
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    n = len(body) if length is None else length
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {n}\r\nConnection: close\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


def random_text(rng, n):
    return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(n))


def bad_value(rng):
    return rng.choice(
        [None, True, -1, 0, 2**64, -(2**63), 1e308, -1e308, "x", "", [], {}, [1, "a"],
         {"a": {"b": []}}, random_text(rng, 5), 3.5, "NaN", 10**30]
    )


FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "min_p", "n", "seed", "stop", "echo", "logprobs", "stream", "best_of",
          "suffix", "model"]


def malformed(rng, k):
    """The k-th abuse request (a category in turn, randomised inside it)."""
    kind = k % 14
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    if kind == 0:  # random bytes as the body
        return "random bytes", request("POST", path, os.urandom(rng.randrange(0, 2000)))
    if kind == 1:  # random text
        return "random text", request("POST", path, random_text(rng, rng.randrange(0, 500)))
    if kind == 2:  # a valid request cut short
        body = json.dumps({"prompt": "The patient", "max_tokens": 4, "temperature": 0})
        return "truncated JSON", request("POST", path, body[: rng.randrange(0, len(body))])
    if kind == 3:  # JSON that is not an object
        return "not an object", request("POST", path, json.dumps(bad_value(rng)))
    if kind == 4:  # an object with wrong or out-of-range fields
        body = {f: bad_value(rng) for f in rng.sample(FIELDS, rng.randrange(1, 6))}
        return "wrong fields", request("POST", path, json.dumps(body))
    if kind == 5:  # deep nesting
        depth = rng.randrange(100, 100_000)
        return "deep nesting", request("POST", path, "[" * depth + "]" * depth)
    if kind == 6:  # a prompt far beyond the context
        return "huge prompt", request(
            "POST", "/v1/completions",
            json.dumps({"prompt": "fever " * rng.randrange(200, 20_000), "max_tokens": 4}))
    if kind == 7:  # token ids outside the vocabulary, negative, huge
        ids = [rng.choice([-1, 512, 2**31, 2**40, 7]) for _ in range(rng.randrange(1, 20))]
        return "bad token ids", request("POST", "/v1/completions", json.dumps({"prompt": ids}))
    if kind == 8:  # invalid UTF-8 inside a JSON string
        return "invalid UTF-8", request(
            "POST", path, b'{"prompt": "\xff\xfe\xc3", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}')
    if kind == 9:  # odd messages
        messages = rng.choice([
            [], "hi", [{"role": "user"}], [{"content": "x"}], [{"role": 5, "content": []}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            [{"role": "tool", "content": "x"}] * 50, [None], [{"role": "user", "content": {"a": 1}}],
        ])
        return "odd messages", request("POST", "/v1/chat/completions", json.dumps({"messages": messages}))
    if kind == 10:  # wrong methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST", "BREW"])
        p = rng.choice(["/", "/v1", "/v1/models/x", "/../etc/passwd", "/v1/completions?x=%00",
                        "/" + "a" * 5000, "/v1/chat/completions/"])
        return "methods and paths", request(method, p, "{}")
    if kind == 11:  # a Content-Length that lies (the connection is then closed)
        body = json.dumps({"prompt": "x", "max_tokens": 1})
        return "lying length", request("POST", path, body, length=rng.choice([0, 5, len(body) + 100, 2**40]))
    if kind == 12:  # broken HTTP
        return "broken HTTP", rng.choice([
            b"\r\n\r\n", b"POST\r\n\r\n", b"GARBAGE / HTTP/9.9\r\n\r\n", os.urandom(300),
            b"POST /v1/completions HTTP/1.1\r\n" + b"X: " + b"y" * 100_000 + b"\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ])
    # small valid requests with random settings
    body = {"prompt": random_text(rng, rng.randrange(1, 30)), "max_tokens": rng.randrange(0, 6),
            "temperature": rng.choice([0, 0.7, 1.5]), "n": rng.randrange(1, 4),
            "seed": rng.randrange(0, 1000), "logprobs": rng.choice([None, 0, 3]),
            "echo": rng.choice([True, False]), "stop": rng.choice([[], ["a"], "\n"])}
    return "valid, random settings", request("POST", "/v1/completions", json.dumps(body))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    server = subprocess.Popen(
        [RLVR, "serve", "--model", "tests/fixtures/tiny-gemma3", "--tokenizer",
         "tests/fixtures/tiny-tokenizer/tokenizer.json", "--port", "0", "--served-model-name", "tiny"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=open(SERVER_LOG, "w"), text=True)
    line = server.stdout.readline()
    host_port = line.split("http://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    address = (host, int(port))
    normal = request("POST", "/v1/completions",
                     json.dumps({"prompt": "The patient has", "max_tokens": 4, "temperature": 0}))
    status, _, reply = raw(address, normal)
    assert status == 200, reply
    expected = json.loads(reply.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"]
    rss_before = rss_kib(server.pid)

    stop = threading.Event()
    normal_latencies, normal_failures = [], []

    def normal_client():
        while not stop.is_set():
            try:
                status, elapsed, reply = raw(address, normal)
                text = json.loads(reply.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] if status == 200 else None
                if status != 200 or text != expected:
                    normal_failures.append((status, reply[:200]))
                normal_latencies.append(elapsed)
            except Exception as e:  # a timeout or a refused connection is a failure
                normal_failures.append(repr(e))
            time.sleep(0.2)

    statuses, kinds, hangs, latencies = Counter(), Counter(), [], []
    lock = threading.Lock()

    def worker(w):
        rng = random.Random(w)
        for k in range(w, COUNT, WORKERS):
            kind, data = malformed(rng, k)
            try:
                status, elapsed, _ = raw(address, data)
            except socket.timeout:
                with lock:
                    hangs.append(kind)
                continue
            except OSError:
                status, elapsed = "reset", 0.0
            with lock:
                statuses[status if status is not None else "closed"] += 1
                kinds[kind] += 1
                latencies.append(elapsed)

    started = time.monotonic()
    client = threading.Thread(target=normal_client)
    client.start()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    client.join()
    took = time.monotonic() - started
    alive = server.poll() is None
    rss_after = rss_kib(server.pid) if alive else 0
    server.kill()
    server.wait()

    sent = sum(statuses.values()) + len(hangs)
    latencies.sort()
    normal_latencies.sort()
    print(f"abuse requests: {sent} in {took:.0f} s from {WORKERS} workers ({len(kinds)} kinds)")
    print("replies: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    print(f"unanswered within {TIMEOUT:.0f} s: {len(hangs)}")
    print(f"abuse reply time: median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")
    print(f"normal client: {len(normal_latencies)} requests, {len(normal_failures)} failed or "
          f"differed, reply time median {normal_latencies[len(normal_latencies) // 2] * 1000:.0f} ms, "
          f"max {normal_latencies[-1] * 1000:.0f} ms")
    print(f"server alive at the end: {alive} (exit status {server.returncode if not alive else '-'}); resident memory {rss_before // 1024} MiB before, "
          f"{rss_after // 1024} MiB after")
    for failure in normal_failures[:5]:
        print("normal client failure:", failure)
    ok = alive and not hangs and not normal_failures and sent == COUNT
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
