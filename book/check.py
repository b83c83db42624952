"""Check the built book in a real browser: ``python book/check.py`` (``make book-check``).

Serves ``build/book/`` on localhost and opens every HTML page in headless Chromium (Debian's
``/usr/bin/chromium``, driven by playwright, which downloads no browser). A page fails if an
image does not load, a request fails or returns an error status, the console logs an error or a
script throws, or a link inside the site points to a missing page or anchor. One full-page
screenshot per page of the table of contents goes to ``build/book-screenshots/`` (git-ignored),
with ``report.json`` listing every problem. Exit status 1 if there is any.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
#: the flags this machine needs (no network beyond localhost, no GPU, running as root)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: pages Sphinx writes that are not chapters: checked, not photographed
NOT_CHAPTERS = {"genindex.html", "search.html", "py-modindex.html"}


@dataclass
class PageReport:
    page: str
    images: int = 0
    links: int = 0
    problems: list[str] = field(default_factory=list)
    screenshot: str | None = None


def chromium_missing() -> str | None:
    """Why the check cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (Debian's packages)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -r requirements.txt"
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        # the browser asks every server for /favicon.ico whatever the page says; the book has none
        if self.path == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """``site`` on a free localhost port, in a daemon thread; returns the server and its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def pages_of(site: Path) -> list[str]:
    """Every HTML page of the site, relative to it (Sphinx's own ``_static`` and ``_sources`` aside)."""
    return sorted(
        p.relative_to(site).as_posix() for p in site.rglob("*.html") if not p.relative_to(site).parts[0].startswith("_")
    )


# run in the page: every image's load state, every link, every element id
_INSPECT = """() => ({
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id).concat(
       Array.from(document.querySelectorAll('a[name]')).map(a => a.name)),
})"""


def check_site(
    site: Path, shots: Path | None = None, *, chapters: set[str] | None = None, timeout_ms: int = 30_000
) -> list[PageReport]:
    """Open every page of ``site``; screenshots of ``chapters`` (default: every page but Sphinx's
    index and search pages) into ``shots``. Returns one report per page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    site = Path(site).resolve()
    pages = pages_of(site)
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {site}: build the book first (make book)")
    chapters = {p for p in pages if Path(p).name not in NOT_CHAPTERS} if chapters is None else chapters
    if shots is not None:
        shutil.rmtree(shots, ignore_errors=True)
        shots.mkdir(parents=True)
    server, base = serve(site)
    reports, ids, links = [], {}, []
    try:
        with tempfile.TemporaryDirectory(prefix="book-check-profile-") as profile, sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            for rel in pages:
                report = PageReport(rel)
                page = browser.new_page()
                page.on(
                    "console",
                    lambda msg, r=report: (
                        r.problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
                    ),
                )
                page.on("pageerror", lambda err, r=report: r.problems.append(f"script error: {err}"))
                page.on(
                    "requestfailed",
                    lambda req, r=report: r.problems.append(f"request failed: {req.url} ({req.failure})"),
                )
                page.on(
                    "response",
                    lambda resp, r=report: (
                        r.problems.append(f"HTTP {resp.status}: {resp.url}") if resp.status >= 400 else None
                    ),
                )
                page.on(
                    "request",
                    lambda req, r=report, b=base: (
                        r.problems.append(f"leaves the site: {req.url}")
                        if not req.url.startswith((b, "data:", "blob:", "about:"))
                        else None
                    ),
                )
                pending: set[str] = set()
                page.on("request", lambda req, p=pending: p.add(req.url))
                page.on("requestfinished", lambda req, p=pending: p.discard(req.url))
                page.on("requestfailed", lambda req, p=pending: p.discard(req.url))
                page.goto(base + rel, wait_until="load", timeout=timeout_ms)
                try:
                    page.wait_for_load_state("networkidle", timeout=timeout_ms)
                except PlaywrightTimeout:
                    # on a loaded machine "idle" (no request for 500 ms) can take long to be seen;
                    # only a request that never finished is a problem of the page
                    report.problems += [
                        f"request still pending {timeout_ms / 1000:.0f} s after load: {url}" for url in sorted(pending)
                    ]
                seen = page.evaluate(_INSPECT)
                report.images = len(seen["images"])
                report.problems += [f"image did not load: {i['src']}" for i in seen["images"] if not i["ok"]]
                ids[rel] = set(seen["ids"])
                internal = [href for href in seen["links"] if href.startswith(base)]
                report.links = len(internal)
                links += [(report, href[len(base) :]) for href in internal]
                if shots is not None and rel in chapters:
                    out = shots / (rel.removesuffix(".html").replace("/", "__") + ".png")
                    page.screenshot(path=str(out), full_page=True)
                    report.screenshot = str(out)
                page.close()
                reports.append(report)
            browser.close()
    finally:
        server.shutdown()
    for report, target in links:
        parsed = urlparse(target)
        path, anchor = unquote(parsed.path) or report.page, unquote(parsed.fragment)
        if path.endswith("/"):
            path += "index.html"
        if not (site / path).is_file():
            report.problems.append(f"broken link: {target}")
        elif anchor and path.endswith(".html") and anchor not in ids.get(path, set()):
            report.problems.append(f"broken anchor: {target}")
    for report in reports:
        report.problems = list(dict.fromkeys(report.problems))
    return reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=ROOT / "build" / "book")
    ap.add_argument("--shots", type=Path, default=ROOT / "build" / "book-screenshots")
    args = ap.parse_args(argv)
    missing = chromium_missing()
    if missing:
        print(f"book-check cannot run: {missing}", file=sys.stderr)
        return 2
    reports = check_site(args.site, args.shots)
    bad = [r for r in reports if r.problems]
    (args.shots / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
    for r in reports:
        print(
            f"{'FAIL' if r.problems else 'ok  '} {r.page}: {r.images} images, {r.links} internal links"
            + (f", screenshot {Path(r.screenshot).name}" if r.screenshot else "")
        )
        for problem in r.problems:
            print(f"       {problem}")
    shots = sum(r.screenshot is not None for r in reports)
    print(f"{len(reports)} pages, {len(bad)} with problems; {shots} screenshots in {args.shots}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
