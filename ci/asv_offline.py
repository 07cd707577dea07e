"""Make asv's published HTML work without internet: serve its JavaScript and CSS from the html dir.

asv 0.6's `asv publish` writes an index.html that loads jQuery, flot, Bootstrap, stupidtable and
blueimp-md5 from CDNs; offline (most GPU runners, an air-gapped workstation) the page only says
"external (JavaScript) dependencies failed to load". This copies the same libraries, committed in
ci/asv_vendor/ (all MIT; sources and licences in ci/asv_vendor/SOURCES.md), into HTML_DIR/vendor/
and points index.html at them. `asv publish` rewrites index.html, so run it after every publish:

    asv publish && python ci/asv_offline.py && asv preview    # html_dir read from asv.conf.json
    python ci/asv_offline.py path/to/html

Exit 1 when index.html loads a URL that ci/asv_vendor/ does not hold (a newer asv changed its
libraries: the message names the URL), 2 when the html dir or the config cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

VENDOR = Path(__file__).with_name("asv_vendor")


@dataclass(frozen=True)
class Vendored:
    """One library asv 0.6 loads from a CDN, and the committed copy that replaces it."""

    url: str  # exactly as asv's www/index.html writes it
    file: str  # in ci/asv_vendor/
    sha256: str  # of the committed file: a copy changed by hand is refused
    identical: bool  # byte-identical to the CDN file (its integrity hash in asv's index.html matches)


CDNJS, JSDELIVR = "https://cdnjs.cloudflare.com/ajax/libs", "https://cdn.jsdelivr.net/npm"
LIBRARIES = (
    Vendored("https://code.jquery.com/jquery-3.3.1.min.js", "jquery-3.3.1.min.js",
             "160a426ff2894252cd7cebbdd6d6b7da8fcd319c65b70468f10b6690c45d02ef", True),
    # flot: the CDN serves a minified build of 0.8.3; the npm package of the same release ships the source
    Vendored(f"{CDNJS}/flot/0.8.3/jquery.flot.min.js", "jquery.flot-0.8.3.js",
             "b7b931f273c38b1277b9c6c1f4e05c4ec09885a487bddaf3279e2d7e49a38e12", False),
    Vendored(f"{CDNJS}/flot/0.8.3/jquery.flot.time.min.js", "jquery.flot.time-0.8.3.js",
             "a582c832adc7138a6b05aaf61f16ebac274701f1be4afea77e739a1c34b9c41a", False),
    Vendored(f"{CDNJS}/flot/0.8.3/jquery.flot.selection.min.js", "jquery.flot.selection-0.8.3.js",
             "e6c85f6c1ebe4b4da29d8ae238c7c5060283f05f7ef054f6b91817d02c092918", False),
    Vendored(f"{CDNJS}/flot/0.8.3/jquery.flot.categories.min.js", "jquery.flot.categories-0.8.3.js",
             "6e81664b28ea795c734906f4aa15614640a75ac7fbd399a7fb9084040698351a", False),
    Vendored(f"{JSDELIVR}/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js", "jquery.flot.orderBars-1.0.0.js",
             "39735b4f46f96ff4e082572401f47c55a2767b366fd1d1e821e44a8d830a12bf", True),
    Vendored(f"{CDNJS}/stupidtable/1.0.1/stupidtable.min.js", "stupidtable-1.0.1.min.js",
             "dbe923c0966dbcd2c26f2314924cba589a7b31d4e7711c9cb9610f949d0f2a86", True),
    Vendored(f"{CDNJS}/blueimp-md5/2.19.0/js/md5.min.js", "md5-2.19.0.min.js",
             "64d7ded388c562e4bde9e58ce205e5fa01b9734fcd434d496eb7b4fbfe9b927d", True),
    Vendored(f"{JSDELIVR}/bootstrap@3.1.1/dist/js/bootstrap.min.js", "bootstrap-3.1.1.min.js",
             "898d05a17f2cfc5120ddcdba47a885c378c0b466f30f0700e502757e24b403a1", True),
    Vendored(f"{JSDELIVR}/bootstrap@3.1.1/dist/css/bootstrap.min.css", "bootstrap-3.1.1.min.css",
             "e9503448692b738dd260fbd7f7cabf2e11f09b600fa97e6eb3a56eba5b1a7e9b", True),
)  # fmt: skip
BY_URL = {lib.url: lib for lib in LIBRARIES}
BY_LOCAL = {f"vendor/{lib.file}": lib for lib in LIBRARIES}  # a page this script rewrote before

# the tags a browser loads by itself; links in <a href> are only followed when clicked
TAG = re.compile(r"<(?:script|link)\b[^>]*>", re.IGNORECASE)
SOURCE = re.compile(r"""\b(src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
# dropped with the URL: the flot copies are not the CDN's bytes, and a crossorigin request of a
# file:// page fails in Chromium; this script checks every file's sha256 itself instead
CDN_ONLY = re.compile(r"""\s+(?:integrity|crossorigin|referrerpolicy)\s*=\s*["'][^"']*["']""", re.IGNORECASE)


class UnknownLibrary(Exception):
    """index.html loads an external URL that ci/asv_vendor/ does not hold."""


def external_urls(html: str) -> list[str]:
    """Every http(s) URL that a <script> or <link> tag of the page loads."""
    urls = []
    for tag in TAG.findall(html):
        m = SOURCE.search(tag)
        if m and re.match(r"(?:https?:)?//", m.group(2)):
            urls.append(m.group(2))
    return urls


def _checked(lib: Vendored) -> Path:
    path = VENDOR / lib.file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != lib.sha256:
        raise UnknownLibrary(f"{path}: sha256 {digest} is not the recorded {lib.sha256}; restore it from git")
    return path


def rewrite(html: str) -> tuple[str, list[Vendored]]:
    """index.html with each CDN load pointed at vendor/FILE, and the libraries it needs."""
    missing = [url for url in external_urls(html) if url not in BY_URL]
    if missing:
        raise UnknownLibrary(
            "asv's index.html loads " + ", ".join(missing) + ", which ci/asv_vendor/ does not hold: add the file "
            "(and its licence to ci/asv_vendor/SOURCES.md) and a line to LIBRARIES in ci/asv_offline.py"
        )
    used: list[Vendored] = []

    def local(tag_match: re.Match[str]) -> str:
        tag = tag_match.group(0)
        m = SOURCE.search(tag)
        lib = BY_URL.get(m.group(2)) or BY_LOCAL.get(m.group(2)) if m else None
        if lib is None:
            return tag
        used.append(lib)
        tag = tag[: m.start(2)] + f"vendor/{lib.file}" + tag[m.end(2) :]
        return CDN_ONLY.sub("", tag)

    return TAG.sub(local, html), used


def make_offline(html_dir: Path) -> list[Vendored]:
    """Vendor the libraries of html_dir/index.html into html_dir/vendor/; idempotent."""
    index = html_dir / "index.html"
    html, used = rewrite(index.read_text(encoding="utf-8"))
    (html_dir / "vendor").mkdir(exist_ok=True)
    for lib in used:
        shutil.copyfile(_checked(lib), html_dir / "vendor" / lib.file)
    index.write_text(html, encoding="utf-8")
    return used


def _html_dir(config: Path) -> Path:
    try:
        conf = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --config {config} ({e}); pass HTML_DIR or the asv.conf.json path") from e
    return config.parent / conf.get("html_dir", "html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html_dir", nargs="?", type=Path, help="asv's html dir (default: html_dir of --config)")
    parser.add_argument("--config", type=Path, default=Path("asv.conf.json"), help="asv config (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        html_dir = args.html_dir or _html_dir(args.config)
    except ValueError as e:
        print(f"asv_offline: {e}", file=sys.stderr)
        return 2
    if not (html_dir / "index.html").is_file():
        print(f"asv_offline: html_dir {html_dir} has no index.html; run `asv publish` first", file=sys.stderr)
        return 2
    try:
        used = make_offline(html_dir)
    except UnknownLibrary as e:
        print(f"asv_offline: {e}", file=sys.stderr)
        return 1
    print(f"asv_offline: {html_dir / 'index.html'} loads {len(used)} libraries from vendor/, none from the web")
    return 0


if __name__ == "__main__":
    sys.exit(main())
