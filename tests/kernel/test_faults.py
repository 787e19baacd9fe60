"""Fault checks of the Rhai kernel (part 4 of the reliability campaign, RELIABILITY.md):

- an interrupt (`interrupt_request` on control, the kernelspec's interrupt_mode) sent about a
  second into `generate`, `judge`, `grpo`, `evaluate` and `loop {}` ends the cell with an
  `Interrupted` error within INTERRUPT_TIMEOUT seconds, the kernel process lives, and the
  next cell runs; the time from the interrupt to the cell's reply is measured;
- a message signed with the wrong key is dropped on every channel that reads messages (shell,
  control, stdin): no reply, no output, no effect (a wrongly signed interrupt does not stop
  a running cell, a wrongly signed shutdown does not end the kernel), and the kernel logs
  why; rightly signed requests are answered afterwards.

The kernel runs with a scratch $RLVR_HOME (no judge or evaluation cache of an earlier run)
and its standard error in a file, and works on the tiny Gemma 3 fixture and the MedQA
sample. Each workload runs for minutes uninterrupted, so an interrupt a second in always
finds it working. When $KERNEL_TEST_TIMINGS names a file, one line per interrupt
(`case seconds`) is appended to it (run.sh prints them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any
from unittest import TestCase

from jupyter_client.manager import KernelManager
from jupyter_client.session import Session

from kernel_checks import (
    INTERRUPT_TIMEOUT,
    SILENCE_WAIT,
    STARTUP_TIMEOUT,
    TIMEOUT,
    kernel_name_from_env,
)

KERNEL = kernel_name_from_env("rhai")
ROOT = Path(__file__).resolve().parents[2]


def rhai_text(path: Path) -> str:
    """A Rhai string literal holding `path`."""
    return json.dumps(str(path))


TINY = rhai_text(ROOT / "tests" / "fixtures" / "tiny-gemma3")
TOKENIZER = rhai_text(ROOT / "tests" / "fixtures" / "tiny-tokenizer" / "tokenizer.json")
MEDQA = rhai_text(ROOT / "data" / "samples" / "medqa")

# Binds `m` (the tiny model) and `items` (the 200 MedQA sample questions).
SETUP = f"""
let m = model({TINY}, #{{ tokenizer: {TOKENIZER} }});
let items = load("medqa", {MEDQA}, #{{ split: "test" }});
items.len()
"""

# Seconds a long cell runs before the interrupt.
RUN_BEFORE_INTERRUPT = 1.0

# Each runs for minutes when not interrupted.
LONG_CELLS = {
    # greedy: four of these prompts never reach a stop token of the tiny model
    "generate": 'm.generate(["The patient has", "A fever of", "The answer is", "Question:"], '
    "#{ max_tokens: 100000, temperature: 0.0 })",
    "judge": "judge(m, items, #{ samples: 8, max_tokens: 64, batch: 1 })",
    "grpo": 'grpo(m.with_lora(#{ rank: 4, alpha: 8, seed: 1 }), items, '
    '#{ steps: 1000, group: 4, max_tokens: 32, rewards: ["format"] })',
    "evaluate": 'evaluate(m, items, #{ preset: "study", max_tokens: 64, batch: 1 })',
    "loop": "loop {}",
}


class KernelUnderFaults(TestCase):
    """One kernel for all the checks; each check leaves it idle."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.scratch = Path(tempfile.mkdtemp(prefix="rlvr-kernel-faults."))
        home = cls.scratch / "rlvr-home"
        home.mkdir()
        cls.log_path = cls.scratch / "kernel.stderr"
        cls.log = open(cls.log_path, "w")
        cls.km = KernelManager(kernel_name=KERNEL)
        cls.km.start_kernel(env={**os.environ, "RLVR_HOME": str(home)}, stderr=cls.log)
        cls.kc = cls.km.client()
        cls.kc.start_channels()
        try:
            cls.kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        except RuntimeError:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.kc.stop_channels()
        if cls.km.is_alive():
            cls.km.shutdown_kernel(now=True)
        cls.km.cleanup_resources()
        cls.log.close()
        shutil.rmtree(cls.scratch, ignore_errors=True)

    # ----------------------------------------------------------------- helpers

    def _flush(self) -> None:
        for get in (self.kc.get_shell_msg, self.kc.get_iopub_msg, self.kc.get_control_msg):
            while True:
                try:
                    get(timeout=0.1)
                except Empty:
                    break

    def _shell_reply(self, msg_id: str, timeout: float) -> dict[str, Any] | None:
        """The shell reply to msg_id, or None when none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.kc.get_shell_msg(timeout=min(left, 0.5))
            except Empty:
                self.assertTrue(self.km.is_alive(), "the kernel process died")
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg
        return None

    def _iopub(self, msg_id: str, until: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """The iopub messages of msg_id up to the first of type `until` (status idle for
        "idle")."""
        msgs = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 0.5))
            except Empty:
                self.assertTrue(self.km.is_alive(), "the kernel process died")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msgs.append(msg)
            kind = msg["msg_type"]
            if kind == until or (
                until == "idle" and kind == "status" and msg["content"]["execution_state"] == "idle"
            ):
                return msgs
        raise AssertionError(f"no {until} within {timeout} s; got {[m['msg_type'] for m in msgs]}")

    def run_cell(self, code: str, timeout: float = TIMEOUT) -> tuple[dict[str, Any], list]:
        msg_id = self.kc.execute(code, allow_stdin=False)
        reply = self._shell_reply(msg_id, timeout)
        self.assertIsNotNone(reply, f"no reply within {timeout} s to {code!r}")
        return reply, self._iopub(msg_id, "idle")

    def assert_runs_next_cell(self) -> None:
        reply, msgs = self.run_cell("1 + 1")
        self.assertEqual(reply["content"]["status"], "ok", "the next cell failed")
        results = [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result"]
        self.assertEqual(results, ["2"])

    def start_long_cell(self, code: str) -> str:
        """Sends `code` and returns once it has run for RUN_BEFORE_INTERRUPT seconds."""
        self._flush()
        msg_id = self.kc.execute(code, allow_stdin=False)
        self._iopub(msg_id, "execute_input")
        time.sleep(RUN_BEFORE_INTERRUPT)
        early = self._shell_reply(msg_id, 0.05)
        self.assertIsNone(early, f"the cell ended before the interrupt: {early and early['content']}")
        return msg_id

    def kernel_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def setUp(self) -> None:
        self.assertTrue(self.km.is_alive(), "the kernel process died before this check")
        if not getattr(type(self), "loaded", False):
            reply, msgs = self.run_cell(SETUP, timeout=120)
            errors = [m["content"]["evalue"] for m in msgs if m["msg_type"] == "error"]
            self.assertEqual(reply["content"]["status"], "ok", f"setup failed: {errors}")
            type(self).loaded = True

    # ----------------------------------------------------------------- interrupts

    def interrupt(self, case: str) -> None:
        msg_id = self.start_long_cell(LONG_CELLS[case])
        request = self.kc.session.msg("interrupt_request", {})
        started = time.monotonic()
        self.kc.control_channel.send(request)
        reply = self._shell_reply(msg_id, INTERRUPT_TIMEOUT)
        took = time.monotonic() - started
        self.assertIsNotNone(reply, f"{case}: no reply within {INTERRUPT_TIMEOUT} s of the interrupt")
        ireply = self.kc.get_control_msg(timeout=TIMEOUT)
        self.assertEqual(ireply["msg_type"], "interrupt_reply")
        self.assertEqual(ireply["parent_header"]["msg_id"], request["header"]["msg_id"])
        content = reply["content"]
        self.assertEqual(content["status"], "error", f"{case}: the interrupted cell reports {content}")
        self.assertEqual(content["ename"], "Interrupted", f"{case}: {content['evalue']}")
        errors = [m for m in self._iopub(msg_id, "idle") if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1, f"{case}: expected one error output")
        self.assertTrue(self.km.is_alive(), f"{case}: the kernel died of the interrupt")
        self.assert_runs_next_cell()
        print(f"{case}: interrupt to reply {took:.3f} s")
        timings = os.environ.get("KERNEL_TEST_TIMINGS")
        if timings:
            with open(timings, "a") as out:
                out.write(f"{case} {took:.3f}\n")

    def test_interrupt_generate(self) -> None:
        self.interrupt("generate")

    def test_interrupt_judge(self) -> None:
        self.interrupt("judge")

    def test_interrupt_grpo(self) -> None:
        self.interrupt("grpo")

    def test_interrupt_evaluate(self) -> None:
        self.interrupt("evaluate")

    def test_interrupt_loop(self) -> None:
        self.interrupt("loop")

    # ----------------------------------------------------------------- signatures

    def wrong_key(self) -> Session:
        good = self.kc.session
        self.assertTrue(good.key, "the client runs without a signing key: nothing to check")
        return Session(
            key=uuid.uuid4().hex.encode(),
            signature_scheme=good.signature_scheme,
            username=good.username,
        )

    def assert_silent(self, sock, what: str) -> None:
        if sock.poll(timeout=int(SILENCE_WAIT * 1000)):
            raise AssertionError(f"the kernel answered a wrongly signed {what}")

    def test_wrongly_signed_shell_messages_are_dropped(self) -> None:
        bad, good = self.wrong_key(), self.kc.session
        self._flush()
        sock = self.km.connect_shell(identity=uuid.uuid4().hex.encode())
        try:
            sent = bad.send(sock, "execute_request", {
                "code": 'print("ran")', "silent": False, "store_history": True,
                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
            })["header"]["msg_id"]
            self.assert_silent(sock, "execute_request")
            leaked = []
            while True:
                try:
                    msg = self.kc.get_iopub_msg(timeout=0.2)
                except Empty:
                    break
                if msg["parent_header"].get("msg_id") == sent:
                    leaked.append(msg["msg_type"])
            self.assertFalse(leaked, f"iopub output for a wrongly signed request: {leaked}")
            msg_id = good.send(sock, "kernel_info_request", {})["header"]["msg_id"]
            self.assertTrue(sock.poll(timeout=int(TIMEOUT * 1000)), "no reply on shell afterwards")
            _, frames = good.feed_identities(sock.recv_multipart())
            self.assertEqual(good.deserialize(frames)["parent_header"]["msg_id"], msg_id)
        finally:
            sock.close(linger=0)
        self.assertIn("dropped a shell message: its signature does not match the key", self.kernel_log())
        self.assert_runs_next_cell()

    def test_wrongly_signed_control_messages_are_dropped(self) -> None:
        bad, good = self.wrong_key(), self.kc.session
        msg_id = self.start_long_cell("loop {}")
        sock = self.km.connect_control(identity=uuid.uuid4().hex.encode())
        try:
            for kind in ("kernel_info_request", "interrupt_request", "shutdown_request"):
                content = {"restart": False} if kind == "shutdown_request" else {}
                bad.send(sock, kind, content)
                self.assert_silent(sock, kind)
            self.assertTrue(self.km.is_alive(), "a wrongly signed shutdown_request ended the kernel")
            self.assertIsNone(self._shell_reply(msg_id, 0.5), "a wrongly signed interrupt stopped the cell")
            sent = good.send(sock, "interrupt_request", {})["header"]["msg_id"]
            self.assertTrue(sock.poll(timeout=int(TIMEOUT * 1000)), "no reply on control afterwards")
            _, frames = good.feed_identities(sock.recv_multipart())
            reply = good.deserialize(frames)
            self.assertEqual((reply["msg_type"], reply["parent_header"]["msg_id"]), ("interrupt_reply", sent))
        finally:
            sock.close(linger=0)
        reply = self._shell_reply(msg_id, INTERRUPT_TIMEOUT)
        self.assertIsNotNone(reply, "the rightly signed interrupt did not stop the cell")
        self.assertEqual(reply["content"]["ename"], "Interrupted")
        self._iopub(msg_id, "idle")
        self.assertEqual(self.kernel_log().count("dropped a control message: its signature does not match the key"), 3)
        self.assert_runs_next_cell()

    def test_wrongly_signed_stdin_messages_are_dropped(self) -> None:
        bad, good = self.wrong_key(), self.kc.session
        self._flush()
        sock = self.km.connect_stdin(identity=uuid.uuid4().hex.encode())
        try:
            bad.send(sock, "input_reply", {"value": "from a wrong key"})
            self.assert_silent(sock, "input_reply")
            good.send(sock, "input_reply", {"value": "unasked"})
            self.assert_silent(sock, "input_reply")
        finally:
            sock.close(linger=0)
        # The kernel reads stdin on its own task: wait for both lines to be logged.
        deadline = time.monotonic() + TIMEOUT
        while "`input_reply`: no input was asked for" not in self.kernel_log():
            self.assertLess(time.monotonic(), deadline, "the rightly signed input_reply was not read")
            time.sleep(0.1)
        self.assertIn("dropped a stdin message: its signature does not match the key", self.kernel_log())
        self.assert_runs_next_cell()
