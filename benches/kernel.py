#!/usr/bin/env python3
"""Kernel latency: start to kernel_info_reply, and the round trip of a trivial cell.

    python benches/kernel.py [--kernels rhai python3] [--starts 10] [--cells 200]

For each kernelspec, alternating between them:
- start: from launching the kernel process (jupyter_client's KernelManager.start_kernel) to
  the kernel_info_reply of a request sent at once; the client's sockets retry their
  connection every 10 ms (ZeroMQ's default is 100 ms, which would round every start up to it);
- first result: from the same launch to the execute_reply of the cell `1` sent right after
  the kernel_info_reply (the session is ready to run code);
- round trip: from sending execute_request for the cell `1` to the cell's status idle on
  iopub (its execute_reply and execute_result received), after 20 warm-up cells.
Prints one JSON line per kernel with the median and the quartiles of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jupyter_client
import zmq
from jupyter_client import BlockingKernelClient, KernelManager


def wait_reply(kc: BlockingKernelClient, msg_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.001))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def wait_idle(kc: BlockingKernelClient, msg_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.001))
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            return


def start_once(
    name: str, context: zmq.Context
) -> tuple[float, float, KernelManager, BlockingKernelClient]:
    km = KernelManager(kernel_name=name, context=context)
    t0 = time.perf_counter()
    km.start_kernel()
    kc = BlockingKernelClient(context=context)
    kc.load_connection_info(km.get_connection_info())
    kc.start_channels()
    wait_reply(kc, kc.kernel_info())
    info_ms = (time.perf_counter() - t0) * 1000
    wait_reply(kc, kc.execute("1", allow_stdin=False))
    return info_ms, (time.perf_counter() - t0) * 1000, km, kc


def stop(km: KernelManager, kc: BlockingKernelClient) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def round_trips(kc: BlockingKernelClient, cells: int) -> list[float]:
    wait_idle_all = []
    for i in range(20 + cells):
        t0 = time.perf_counter()
        msg_id = kc.execute("1", allow_stdin=False)
        reply = wait_reply(kc, msg_id)
        assert reply["content"]["status"] == "ok", reply["content"]
        wait_idle(kc, msg_id)
        if i >= 20:
            wait_idle_all.append((time.perf_counter() - t0) * 1000)
    return wait_idle_all


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4)
    return {"median": round(statistics.median(values), 2), "q1": round(q[0], 2), "q3": round(q[2], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", default=["rhai", "python3"])
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--cells", type=int, default=200)
    args = ap.parse_args()

    context = zmq.Context()
    context.setsockopt(zmq.RECONNECT_IVL, 10)
    starts: dict[str, list[float]] = {k: [] for k in args.kernels}
    firsts: dict[str, list[float]] = {k: [] for k in args.kernels}
    implementation: dict[str, str] = {}
    for _ in range(args.starts):
        for name in args.kernels:
            info_ms, first_ms, km, kc = start_once(name, context)
            starts[name].append(info_ms)
            firsts[name].append(first_ms)
            info = wait_reply(kc, kc.kernel_info())["content"]
            implementation[name] = f"{info['implementation']} {info['implementation_version']}"
            stop(km, kc)
    for name in args.kernels:
        _, _, km, kc = start_once(name, context)
        trips = round_trips(kc, args.cells)
        stop(km, kc)
        print(json.dumps({
            "kernel": name,
            "implementation": implementation[name],
            "jupyter_client": jupyter_client.__version__,
            "start_to_kernel_info_ms": summary(starts[name]),
            "start_to_first_result_ms": summary(firsts[name]),
            "trivial_cell_round_trip_ms": summary(trips),
            "starts": len(starts[name]),
            "cells": len(trips),
        }))


if __name__ == "__main__":
    main()
