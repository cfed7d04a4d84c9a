#!/usr/bin/env python
"""Screenshots of the `effigen serve` page for the docs, taken in headless Chromium (Playwright driving the system's
chromium, as tests/test_serve.py does): the Generate tab after generating, the Edit tab after painting a mask on a
generated image and editing it, and the Compare tab.

    python scripts/serve_screenshots.py --pipelines runs/mnist-dit/final runs/mnist-var/final \\
        --generate mnist-var --out docs/images/serve

It starts `effigen serve` on a free loopback port with the given folders, drives the page like a user, writes
generate.png, edit.png and compare.png into --out, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def choose(page, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input")
    page.click(f"ul[role=listbox] li:text-is('{option}')")
    page.wait_for_timeout(300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", required=True)
    parser.add_argument("--generate", help="pipeline name to generate with (default: the first served)")
    parser.add_argument("--class", dest="label", default="", help="class to generate (default: every class in turn)")
    parser.add_argument("--batch", default="16")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", default="docs/images/serve")
    parser.add_argument("--chromium", default=os.environ.get("EFFIGEN_CHROMIUM") or shutil.which("chromium")
                        or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "effigen", "serve", "--pipelines", *args.pipelines,
                               "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url, wait_until="load")
            page.wait_for_selector("#generate-button")
            if args.generate:
                choose(page, "#generate-pipeline", args.generate)
            page.fill("#generate-class textarea, #generate-class input", args.label)
            page.fill("#generate-seed input", args.seed)
            page.fill("#generate-batch input", args.batch)
            page.click("#generate-button")
            page.wait_for_function("document.querySelector('#generate-time textarea, #generate-time input').value"
                                   ".includes('images from')", timeout=300_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "generate.png"), full_page=True)
            print(f"wrote {out / 'generate.png'}")

            page.locator("#generate-gallery img").nth(0).click()
            page.keyboard.press("Escape")  # close the gallery's preview
            page.click("#generate-send-to-edit")
            page.wait_for_selector("#edit-canvas canvas")
            page.wait_for_timeout(800)
            page.click("#edit-canvas button[aria-label='Brush']")
            box = page.locator("#edit-canvas canvas").last.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x - 40, y - 60)
            page.mouse.down()
            for i in range(25):
                page.mouse.move(x - 40 + 3 * i, y - 60 + 5 * i)
            page.mouse.up()
            page.click("#edit-button")
            page.wait_for_function("document.querySelector('#edit-time textarea, #edit-time input').value"
                                   ".includes('edits (')", timeout=300_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "edit.png"), full_page=True)
            print(f"wrote {out / 'edit.png'}")

            page.get_by_role("tab", name="Compare").click()
            page.click("#compare-button")
            page.wait_for_selector("#compare-table table", timeout=300_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "compare.png"), full_page=True)
            print(f"wrote {out / 'compare.png'}")
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
