"""Check that the built site renders its mathematics offline, in a real browser.

Opens every page with mathematics from ``site/`` through ``file://`` in headless Chromium
with its network off, lets MathJax run, and counts the typeset formulas
(``<mjx-container>`` elements) against the formulas on the page (``arithmatex``
elements). ``make docs`` runs it when Chromium is installed (``apt-get install chromium``);
without Chromium it says so and checks nothing.

    python docs/check_render.py [site_dir]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def rendered(page: Path, chromium: str) -> int:
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    return dom.count("<mjx-container")


def main(site: Path) -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("check_render: Chromium is not installed; the rendering was not checked")
        return 0
    pages = [p for p in sorted(site.rglob("*.html")) if 'class="arithmatex"' in p.read_text()]
    if not pages:
        print("check_render: no page with mathematics in", site)
        return 1
    bad = 0
    for page in pages:
        want = page.read_text().count('class="arithmatex"')
        got = rendered(page, chromium)
        status = "ok" if got >= want else "NOT RENDERED"
        bad += got < want
        print(f"check_render: {page.relative_to(site)}: {got}/{want} formulas typeset, {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "site")))
