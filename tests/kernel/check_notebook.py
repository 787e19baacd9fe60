#!/usr/bin/env python3
"""Executes a notebook headless through a named kernel and checks what its outputs show.

    python check_notebook.py NOTEBOOK --kernel NAME [--expect WHAT]... [--output FILE]
                             [--save-images DIR] [--cwd DIR] [--timeout SECONDS]
                             [--startup-timeout SECONDS]

WHAT is one of:
  html-table  some output has text/html containing a <table>
  image       some output has an image: image/png (a real PNG) or image/svg+xml (an <svg>)
  png         some output has a real PNG in image/png
  svg         some output has an <svg> in image/svg+xml
  stdout      some cell printed to stdout
Without --expect, the notebook's metadata `rlvr.expect` (a list of the names above) says what
to expect, and without that html-table and image are expected. A code cell's own metadata
`rlvr.expect` says what that cell must show (a table here, a PNG there), whatever --expect
says. Every cell must run without an error.

The kernel runs with the notebook's folder as its working directory (or --cwd DIR), so the
notebook can read files beside it. Every wait is bounded: the kernel start (--startup-timeout,
default 60 s) and each cell (--timeout, default 120 s); a kernel that fails to start or dies is
reported as a FAIL line, never a hang, and no cell may ask for input. The executed notebook is written to --output (default: a temporary file), and
each image to --save-images, so a person can open them. The last line reads
"N passed, N failed"; the exit status is 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import binascii
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHECKS = ("html-table", "image", "png", "svg", "stdout")


def rich_outputs(nb: nbformat.NotebookNode):
    """(cell index, output index, data bundle) for every execute_result and display_data."""
    for ci, cell in enumerate(nb.cells):
        for oi, out in enumerate(cell.get("outputs", [])):
            if out.get("output_type") in ("execute_result", "display_data"):
                yield ci, oi, out.get("data", {})


def as_text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def png_bytes(value) -> bytes | None:
    try:
        raw = base64.b64decode(as_text(value), validate=False)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(PNG_MAGIC) else None


def cell_expectations(cell: nbformat.NotebookNode) -> list[str]:
    """What a code cell's metadata `rlvr.expect` says it must show."""
    if cell.get("cell_type") != "code":
        return []
    return list(cell.get("metadata", {}).get("rlvr", {}).get("expect", []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--kernel", required=True, help="kernelspec name")
    ap.add_argument("--expect", action="append", choices=CHECKS)
    ap.add_argument("--output", type=Path, help="where to write the executed notebook")
    ap.add_argument("--save-images", type=Path, help="folder to write each image output into")
    ap.add_argument("--cwd", type=Path, help="the kernel's working directory (default: the notebook's folder)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per cell")
    ap.add_argument("--startup-timeout", type=int, default=60, help="seconds for the kernel to start")
    args = ap.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    expect = args.expect or nb.metadata.get("rlvr", {}).get("expect") or ["html-table", "image"]
    unknown = set(expect).union(*(cell_expectations(c) for c in nb.cells)) - set(CHECKS)
    if unknown:
        print(f"FAIL  {args.notebook}: unknown expectations {sorted(unknown)}")
        return 2
    client = NotebookClient(
        nb,
        kernel_name=args.kernel,
        timeout=args.timeout,
        startup_timeout=args.startup_timeout,
        allow_errors=False,
        resources={"metadata": {"path": str((args.cwd or args.notebook.resolve().parent).resolve())}},
    )
    results: list[tuple[str, bool, str]] = []
    try:
        client.execute()
        results.append(("cells run without error", True, f"{len(nb.cells)} cells"))
    except CellExecutionError as err:
        # The error's name and message; its traceback is in the executed notebook.
        message = ANSI.sub("", f"{err.ename}: {err.evalue}").strip()
        failed_cell = next((ci for ci, c in enumerate(nb.cells) if any(
            o.get("output_type") == "error" for o in c.get("outputs", []))), "?")
        results.append(("cells run without error", False, f"cell {failed_cell}: {message}"))
    except CellTimeoutError as err:
        text = ANSI.sub("", str(err)).strip()
        results.append(("cells run without error", False, text.splitlines()[0] if text else "timeout"))
    except Exception as err:  # kernel missing, failed to start, timed out starting, or died
        # nbclient's exit-time cleanup would trip over the kernel that never started.
        atexit.unregister(client._cleanup_kernel)
        text = ANSI.sub("", str(err)).strip().splitlines()
        results.append(
            ("kernel ran the notebook", False, f"{type(err).__name__}: {text[-1] if text else ''}")
        )

    output = args.output or Path(tempfile.mkstemp(suffix=".ipynb")[1])
    nbformat.write(nb, output)

    shown = [set() for _ in nb.cells]  # per cell: the CHECKS its outputs meet
    for ci, oi, data in rich_outputs(nb):
        if "<table" in as_text(data.get("text/html", "")).lower():
            shown[ci].add("html-table")
        if "image/png" in data and (raw := png_bytes(data["image/png"])):
            shown[ci].update(("png", "image"))
            if args.save_images:
                args.save_images.mkdir(parents=True, exist_ok=True)
                (args.save_images / f"cell{ci}_{oi}.png").write_bytes(raw)
        svg = as_text(data.get("image/svg+xml", ""))
        if "<svg" in svg:
            shown[ci].update(("svg", "image"))
            if args.save_images:
                args.save_images.mkdir(parents=True, exist_ok=True)
                (args.save_images / f"cell{ci}_{oi}.svg").write_text(svg)
    for ci, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                shown[ci].add("stdout")

    for name in expect:
        where = [f"cell {ci}" for ci in range(len(nb.cells)) if name in shown[ci]]
        results.append((f"output has {name}", bool(where), ", ".join(where) or "none"))
    for ci, cell in enumerate(nb.cells):
        for name in cell_expectations(cell):
            detail = ", ".join(sorted(shown[ci])) or "nothing checkable"
            results.append((f"cell {ci} shows {name}", name in shown[ci], f"it shows {detail}"))

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"executed notebook: {output}")
    passed = sum(ok for _, ok, _ in results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
