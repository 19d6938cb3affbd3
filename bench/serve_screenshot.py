"""The README's screenshot of the web chat: `nanoseek serve` on a checkpoint, one question asked in headless Chromium
(Playwright), the thinking block opened, the page saved as a PNG.

    python bench/serve_screenshot.py --model runs/pretrain --out docs/images/serve-chat.png

Needs Playwright (`pip install playwright`) and a Chromium binary (`apt-get install chromium`, or --chromium).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with status {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"the server did not answer {url} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/pretrain", help="checkpoint or run directory (default: %(default)s)")
    parser.add_argument("--template", default="question", choices=("question", "chat", "r1-zero"),
                        help="how the message becomes a prompt (default: %(default)s, the built-in corpus's format)")
    parser.add_argument("--message", default="What is 52 + 36?", help="the question asked (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None, help="the model's name on the page (default: --model)")
    parser.add_argument("--out", default="docs/images/serve-chat.png", help="the PNG written (default: %(default)s)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium binary (default: chromium on PATH)")
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("no Chromium found: apt-get install chromium, or pass --chromium")
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", args.model, "--template",
                               args.template, "--temperature", "0", "--port", str(port),
                               "--served-model-name", args.served_model_name or args.model])
    try:
        wait_for_health(f"{url}/health", server, timeout=120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(url)
            page.fill("#input", args.message)
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelector('.message.assistant .meta')?.textContent.includes('tokens')",
                                   timeout=120_000)
            page.click(".message.assistant summary")  # open the collapsed thinking
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            print(f"thinking: {page.text_content('.message.assistant .thinking-text')!r}")
            print(f"answer:   {page.text_content('.message.assistant .answer')!r}")
            browser.close()
    finally:
        server.terminate()
        server.wait(60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
