#!/usr/bin/env python3
"""Greedy decoding speed of llama.cpp's `llama-server` on a GGUF, the reference column of
`rlvr bench model --task decode` (benches/model.sh writes the same token ids).

Starts `llama-server -m GGUF -t THREADS -np BATCH`, sends BATCH requests at once, each the
`prompt_16` token ids of IDS with `n_predict` TOKENS, greedy, end-of-sequence ignored, and
prints one JSON line: the batch's new tokens over the wall time from the first request to
the last answer (the short prompts' prefill included, as rlvr's bench includes it), and the
server's own decoding speed of one request (`timings.predicted_per_second`).

Standard library only. Usage:

    LLAMA_SERVER=/path/to/llama-server benches/llamacpp_decode.py GGUF IDS [--batch 1]
        [--tokens 128] [--threads 2] [--server-args "--no-repack"]

`--server-args` passes more arguments to llama-server (split on spaces): on a CPU whose AMX
tiles the virtual machine does not enable, llama.cpp's repacked weights stop the server with
an illegal instruction, and `--no-repack` keeps it on its plain AVX-512 kernels.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

PORT = 18393


def post(path, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORT}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def wait_healthy(server):
    for _ in range(240):
        if server.poll() is not None:
            sys.exit(f"llama-server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit("llama-server did not become healthy in 120 s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("ids")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-args", default="")
    args = parser.parse_args()
    binary = os.environ.get("LLAMA_SERVER")
    if not binary:
        sys.exit("set LLAMA_SERVER to the llama-server binary")
    prompt = json.load(open(args.ids))["prompt_16"]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.path.dirname(binary) + ":" + env.get("LD_LIBRARY_PATH", "")
    server = subprocess.Popen(
        [binary, "-m", args.gguf, "--port", str(PORT), "-t", str(args.threads),
         "-tb", str(args.threads), "-np", str(args.batch),
         "-c", str(args.batch * (len(prompt) + args.tokens + 16)), "--no-webui",
         *args.server_args.split()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        wait_healthy(server)
        body = {"prompt": prompt, "n_predict": args.tokens, "temperature": 0.0,
                "ignore_eos": True, "cache_prompt": False}
        post("/completion", dict(body, n_predict=8))  # warm-up
        answers = [None] * args.batch

        def one(i):
            answers[i] = post("/completion", body)

        started = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        tokens = sum(a["timings"]["predicted_n"] for a in answers)
        print(json.dumps({
            "impl": "llama-server", "task": "decode", "batch": args.batch,
            "tokens": args.tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "server_predicted_per_second": answers[0]["timings"]["predicted_per_second"],
        }))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
