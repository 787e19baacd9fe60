#!/usr/bin/env python3
"""Opens a notebook in JupyterLab with headless Chromium, runs all its cells with the Rhai
kernel, and checks that the page shows a rendered table (and with --images, pictures).

    python browser_check.py --root REPO --notebook examples/x.ipynb --screenshot out.png
                            [--images] [--chromium /usr/bin/chromium] [--timeout SECONDS]

JupyterLab serves a scratch copy of the repository's examples/ (with data/ and
tests/fixtures/ linked beside it), so running the notebook in the browser never writes to
the repository. Playwright drives
Debian's Chromium (its own browser downloads are not used). The kernelspec "rhai" must be
installed where Jupyter finds it. Every wait is bounded; a screenshot is saved in any case.
Prints PASS/FAIL lines and ends with "N passed, N failed"; exit 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="the repository")
    ap.add_argument("--notebook", required=True, help="path of the notebook inside the repository")
    ap.add_argument("--screenshot", type=Path, required=True)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=120, help="seconds for each wait")
    ap.add_argument("--images", action="store_true", help="the page must show loaded pictures too")
    args = ap.parse_args()

    results: list[tuple[str, bool, str]] = []
    scratch = Path(tempfile.mkdtemp(prefix="rlvr-lab-browser-"))
    shutil.copytree(args.root / "examples", scratch / "examples")
    (scratch / "data").symlink_to((args.root / "data").resolve())
    (scratch / "tests").mkdir()
    (scratch / "tests" / "fixtures").symlink_to((args.root / "tests" / "fixtures").resolve())
    port, token = free_port(), secrets.token_hex(16)
    log = open(scratch / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={scratch}",
            "--LabApp.news_url=", "--ServerApp.allow_root=True",
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "JUPYTERLAB_WORKSPACES_DIR": str(scratch / "workspaces")},
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server, args.timeout)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            timeout_ms = int(args.timeout * 1000)
            page.set_default_timeout(timeout_ms)
            try:
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{args.notebook}?token={token}")
                page.wait_for_selector(".jp-Notebook .jp-Cell")
                # The kernel is up once the toolbar names it and its status reads idle.
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.jp-Toolbar-kernelName')]"
                    ".some(e => e.textContent.includes('Rhai (rlvr)'))"
                )
                results.append(("notebook opened with the Rhai (rlvr) kernel", True, args.notebook))
                page.wait_for_selector(
                    ".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached"
                )
                page.locator(".lm-MenuBar-item", has_text="Run").first.click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                # Every code cell has run once each prompt shows its execution count.
                page.wait_for_function(
                    "() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];"
                    " return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }"
                )
                tables = page.locator(".jp-OutputArea-output table")
                results.append(("rendered tables in the page", tables.count() > 0, f"{tables.count()} tables"))
                first = tables.first
                first.scroll_into_view_if_needed()
                rows = first.evaluate("t => t.querySelectorAll('tbody tr').length")
                header = first.evaluate("t => t.querySelector('thead').innerText")
                results.append(("the first table has rows", rows > 0, f"{rows} rows, {header.split()[:6]}"))
                if args.images:
                    # Plots arrive as PNG and SVG; JupyterLab renders the one it ranks first as
                    # an <img>, which must have loaded (a broken picture has no natural width).
                    page.wait_for_function(
                        "() => [...document.querySelectorAll('.jp-OutputArea-output img')]"
                        ".every(i => i.complete)"
                    )
                    pictures = page.locator(".jp-OutputArea-output img")
                    sizes = pictures.evaluate_all(
                        "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
                    )
                    if pictures.count():
                        pictures.first.scroll_into_view_if_needed()  # into the screenshot
                    loaded = [s for s in sizes if s[0] > 0 and s[1] > 0]
                    results.append((
                        "rendered pictures in the page",
                        bool(loaded) and len(loaded) == len(sizes),
                        f"{len(loaded)} of {len(sizes)} loaded: {sizes}",
                    ))
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count()
                results.append(("no error output", errors == 0, f"{errors} error outputs"))
            except PlaywrightTimeout as err:
                results.append(("the page reached every step", False, str(err).splitlines()[0]))
            finally:
                args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshot), full_page=True)
                browser.close()
    except Exception as err:  # JupyterLab did not start, Chromium did not launch
        results.append(("JupyterLab and Chromium ran", False, f"{type(err).__name__}: {err}"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        failed_any = not all(ok for _, ok, _ in results)
        if failed_any:
            print((scratch / "jupyterlab.log").read_text()[-3000:])
        shutil.rmtree(scratch, ignore_errors=True)

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"screenshot: {args.screenshot}")
    passed = sum(ok for _, ok, _ in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if results and passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
