"""Conformance suite for a Rhai Jupyter kernel.

Two layers run against one kernel process:
- `jupyter_kernel_test.KernelTests`, the Jupyter project's own suite, driven by the `code_*`
  and `*_samples` attributes below;
- `kernel_checks.ProtocolChecks`, checks that suite does not make (execution counts and iopub
  order, kernel_info fields, errors and recovery, silent runs, state across cells, completion
  contents and cursors, inspect, is_complete, history, comm_info, interrupt, aborting queued
  cells after an error, display updates, rich output, wrongly signed messages, loopback-only
  listening);
and `ShutdownChecks` runs a second kernel and shuts it down.

The kernel is the kernelspec named by $KERNEL_NAME (run.sh sets it), "rhai" by default.

Samples come in three kinds:
- plain Rhai: must hold for any Rhai kernel;
- KERNEL DESIGN: a choice the kernel makes (marked where used);
- PROJECT SURFACE: functions of the project's script surface (`load`, `display`,
  `plot_bars`, `endpoint`, `help`, `clear_output`, `progress`), grouped at the end of the
  class.
"""

import json
from pathlib import Path
from unittest import TestCase

import jupyter_kernel_test as jkt

from kernel_checks import ProtocolChecks, ShutdownChecks, kernel_name_from_env

KERNEL = kernel_name_from_env("rhai")

# A six-row table (category, accuracy, n) shipped with this harness; its numbers are made up
# for display tests and mean nothing.
SCORES_CSV = json.dumps(str(Path(__file__).resolve().parent / "data" / "scores.csv"))


class RhaiKernelTests(ProtocolChecks, jkt.KernelTests):
    kernel_name = KERNEL
    language_name = "rhai"
    file_extension = ".rhai"
    # KERNEL DESIGN ASSUMPTION: the mimetype the kernel reports in language_info.
    language_mimetype = "text/x-rhai"

    # ---- plain Rhai --------------------------------------------------------------------
    # print() goes to the stdout stream.
    code_hello_world = 'print("hello, world")'
    # A failing cell: exactly one iopub output, an `error` message (no extra stream text),
    # and execute_reply status "error".
    code_generate_error = 'throw "boom"'
    # The thrown value must appear in evalue (ename is the kernel's choice, so not fixed here).
    error_evalue_contains = "boom"
    # The last expression's value is the execute_result; text/plain is Rhai's debug form.
    code_execute_result = [
        {"code": "6*7", "result": "42"},
        {"code": "[1, 2, 3].map(|x| x * x)", "result": "[1, 4, 9]"},
    ]
    # history_request: "tail" (consoles use it for up-arrow) and "range" through upstream's
    # test_history; "search" through test_extra_history_search, whose requests name `n` and
    # `unique`. Upstream's search sends neither, and jupyter-protocol 2, which reads the
    # kernel's messages, requires both (and `stop` for range), so such a request is dropped
    # unanswered before the kernel sees it; the kernel's unit tests (kernel::history) cover
    # what it would answer: every match without `n`, unique off without `unique`.
    code_history_pattern = "6*"
    supported_history_operations = ("tail", "range", "search")

    # complete_request: only the reply's shape is checked here; its contents and cursor
    # positions are checked by completion_includes below.
    completion_samples = [{"text": "pri"}]
    # is_complete_request: a parse error at the end of the text means "incomplete" (the
    # console asks for another line), any other parse error "invalid".
    complete_code_samples = ["let x = 1;", 'print("hello, world")', "fn f(a) { a * 2 }", "6*7"]
    incomplete_code_samples = ["fn f() {", "let v = [1, 2,", "if true {\n    print(1);", "let m = #{ a: 1,"]
    invalid_code_samples = ["let = 5;", "1 +* 2", "}"]
    # inspect_request on a standard-library function finds its signature and doc comment.
    code_inspect_sample = "to_upper"

    # ProtocolChecks samples
    code_define_state = "let kept = 41;"
    code_use_state = "kept + 1"
    state_result = "42"
    # Interrupted through the kernelspec's interrupt_mode ("message" suits a Rust kernel; set
    # interrupt_modes = ("signal", "message") to demand both).
    code_long_running = "loop {}"
    code_slow_error = 'let n = 0; for i in 0..200000 { n += i; } throw "boom";'
    completion_includes = [
        {"text": "pri", "includes": ["print"], "cursor_start": 0},
        {"text": "let y = pri", "includes": ["print"], "cursor_start": 8},
        {"text": 'pri("x")', "cursor_pos": 3, "includes": ["print"], "cursor_start": 0},
        {"setup": "let kept_too = 1;", "text": "kept_t", "includes": ["kept_too"], "cursor_start": 0},
        {"text": 'let s = "abc"; s.to_up', "includes": ["to_upper"], "cursor_start": 17},
    ]
    code_inspect_missing = "no_such_name_anywhere_42"

    # ---- KERNEL DESIGN --------------------------------------------------------------------
    # Rhai has no eprint; the kernel sends debug() output to the stderr stream.
    code_stderr = 'debug("to stderr")'

    # ---- PROJECT SURFACE ---------------------------------------------------------------
    # `load(path)` reads a table file as it is (a DataFrame); `display(x)` sends display_data;
    # a DataFrame's bundle has text/html with a <table> and text/plain; a plot's has
    # image/png (base64, so it starts "iVBORw0KGgo") and image/svg+xml. The example
    # notebooks check the charts cell by cell (check_notebook.py).
    code_display_data = [
        {"code": f"display(load({SCORES_CSV}))", "mime": "text/html"},
        {"code": f"display(load({SCORES_CSV}))", "mime": "text/plain"},
    ]
    rich_output_samples = [
        {"code": f"load({SCORES_CSV}).head(3)", "mime": "text/html", "contains": "<table"},
        {"code": f"load({SCORES_CSV}).head(3)", "mime": "text/plain", "contains": "shape: (3, 3)"},
        {"code": f'plot_bars(load({SCORES_CSV}), "category", "accuracy")', "mime": "image/png",
         "contains": "iVBORw0KGgo"},
        {"code": f'display(plot_bars(load({SCORES_CSV}), "category", "accuracy"))',
         "mime": "image/svg+xml", "contains": "<svg"},
        # A value of the surface's own types shows as its own text, not as a Rust type name
        # (`endpoint` sends nothing until asked).
        {"code": 'endpoint("http://127.0.0.1:9/v1", "tiny")', "mime": "text/plain",
         "contains": "Endpoint(tiny at http://127.0.0.1:9/v1)"},
        {"code": 'display([endpoint("http://127.0.0.1:9/v1", "tiny")])', "mime": "text/plain",
         "contains": "[Endpoint(tiny at http://127.0.0.1:9/v1)]"},
    ]
    # help(name) pages a function's signatures and doc (execute_reply payload, source "page").
    code_page_something = 'help("load")'
    # clear_output() sends clear_output.
    code_clear_output = "clear_output()"
    # progress(total, label) shows a display_data with transient.display_id; tick() advances
    # it with update_display_data (the kernel's Progress, as long jobs use it).
    code_update_display = 'let bar = progress(3, "demo"); for i in 0..3 { bar.tick(); }'


class RhaiShutdownTests(ShutdownChecks, TestCase):
    kernel_name = KERNEL
