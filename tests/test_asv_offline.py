"""asv's published HTML without internet: ci/asv_offline.py serves its libraries from the html dir."""

import base64
import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import asv
import pytest

from ci import asv_offline

REPO = Path(__file__).parent.parent

WWW = Path(asv.__file__).parent / "www"  # what `asv publish` copies into the html dir
CHROMIUM = shutil.which("chromium")
FAILED = "failed to load"  # asv's error.html: "One or more external (JavaScript) dependencies ... failed to load"


def _published(tmp_path: Path) -> Path:
    html = tmp_path / "html"
    shutil.copytree(WWW, html)
    return html


def test_every_library_the_installed_asv_loads_from_the_web_is_vendored():
    urls = asv_offline.external_urls((WWW / "index.html").read_text(encoding="utf-8"))
    assert len(urls) == 10, urls  # jquery, 4 flot files, orderBars, stupidtable, md5, bootstrap js + css
    assert [u for u in urls if u not in asv_offline.BY_URL] == []


def test_vendored_files_are_the_cdn_files_asv_names():
    """Each file marked identical hashes to the integrity value asv's index.html gives the CDN copy."""
    html = (WWW / "index.html").read_text(encoding="utf-8")
    integrity = dict(re.findall(r'(?:src|href)="([^"]+)"[^>]*?integrity="([^"]+)"', html))
    identical = [lib for lib in asv_offline.LIBRARIES if lib.identical]
    assert len(identical) == 6
    for lib in identical:
        algo, expected = integrity[lib.url].split("-", 1)
        digest = base64.b64encode(hashlib.new(algo, (asv_offline.VENDOR / lib.file).read_bytes()).digest()).decode()
        assert digest == expected, f"{lib.file} is not the file asv loads from {lib.url}"
    for lib in asv_offline.LIBRARIES:
        assert asv_offline._checked(lib).is_file()  # every committed file still has its recorded sha256
    sources = (asv_offline.VENDOR / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"`{lib.file}`" in sources for lib in asv_offline.LIBRARIES)


def test_the_page_loads_nothing_from_the_web_after_the_step(tmp_path, capsys):
    html = _published(tmp_path)
    assert asv_offline.external_urls((html / "index.html").read_text(encoding="utf-8"))  # before: CDN URLs
    assert asv_offline.main([str(html)]) == 0
    page = (html / "index.html").read_text(encoding="utf-8")
    assert asv_offline.external_urls(page) == []
    assert "integrity=" not in page and "crossorigin=" not in page
    assert sorted(p.name for p in (html / "vendor").iterdir()) == sorted(lib.file for lib in asv_offline.LIBRARIES)
    assert 'href="https://github.com/airspeed-velocity/asv/"' in page  # plain links stay links
    # a second run (or one after the vendor folder was lost) leaves the page as it is and restores the files
    shutil.rmtree(html / "vendor")
    assert asv_offline.main([str(html)]) == 0
    assert (html / "index.html").read_text(encoding="utf-8") == page
    assert len(list((html / "vendor").iterdir())) == len(asv_offline.LIBRARIES)
    assert "loads 10 libraries from vendor/, none from the web" in capsys.readouterr().out


def test_an_unknown_library_fails_naming_its_url(tmp_path, capsys):
    html = _published(tmp_path)
    index = html / "index.html"
    before = index.read_text(encoding="utf-8").replace(
        "</head>", '<script src="https://cdn.example/new.js"></script></head>'
    )
    index.write_text(before, encoding="utf-8")
    assert asv_offline.main([str(html)]) == 1
    err = capsys.readouterr().err
    assert "https://cdn.example/new.js" in err and "ci/asv_vendor/" in err
    assert index.read_text(encoding="utf-8") == before  # nothing half-done


def test_a_changed_vendored_file_is_refused(tmp_path, monkeypatch):
    vendor = tmp_path / "vendor"
    shutil.copytree(asv_offline.VENDOR, vendor)
    (vendor / "md5-2.19.0.min.js").write_text("tampered")
    monkeypatch.setattr(asv_offline, "VENDOR", vendor)
    html = _published(tmp_path)
    assert asv_offline.main([str(html)]) == 1


def test_html_dir_defaults_to_asv_conf_and_bad_paths_exit_2(tmp_path, capsys):
    assert asv_offline.main([str(tmp_path / "nowhere")]) == 2
    assert "has no index.html; run `asv publish` first" in capsys.readouterr().err
    assert asv_offline.main(["--config", str(tmp_path / "asv.conf.json")]) == 2
    assert "cannot read --config" in capsys.readouterr().err
    (tmp_path / "asv.conf.json").write_text('{"html_dir": "site"}')
    shutil.copytree(WWW, tmp_path / "site")
    assert asv_offline.main(["--config", str(tmp_path / "asv.conf.json")]) == 0
    assert (tmp_path / "site" / "vendor").is_dir()
    assert asv_offline._html_dir(REPO / "asv.conf.json") == REPO / ".asv" / "html"  # this project's setting


def _asv_project(tmp_path: Path) -> Path:
    """A one-benchmark asv project, run in this Python and published: the real page with real results."""
    root = tmp_path / "proj"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "bench_tiny.py").write_text("def track_answer():\n    return 42.0\n")
    (root / "asv.conf.json").write_text(
        '{"version": 1, "project": "tiny", "repo": ".", "branches": ["main"], "environment_type": "existing",'
        ' "benchmark_dir": "benchmarks", "results_dir": "results", "html_dir": "html"}'
    )
    env = os.environ | {"HOME": str(tmp_path), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    asv_cli = [sys.executable, "-m", "asv"]
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny"],
        [*asv_cli, "machine", "--yes", "--machine", "testbox"],  # writes $HOME/.asv-machine.json: the tmp one
        [*asv_cli, "run", "--python=same", "--set-commit-hash", "HEAD", "--machine", "testbox"],
        [*asv_cli, "publish"],
    ):
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-1000:]}{done.stderr[-1000:]}"
    return root / "html"


def _dom(tmp_path: Path, url: str) -> str:
    """The page's DOM after its scripts ran, in a Chromium that reaches nothing but the loopback."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000", "--dump-dom", url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.stdout, f"chromium dumped no DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) to load the page")
def test_the_published_page_works_offline_in_chromium(tmp_path):
    html = _asv_project(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]  # keep pytest's output clean
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # as `asv preview` serves it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    try:
        assert FAILED in _dom(tmp_path, url)  # as asv publishes it: the CDNs are out of reach
        assert asv_offline.main([str(html)]) == 0
        dom = _dom(tmp_path, url)
        assert FAILED not in dom
        assert "bench_tiny.track_answer" in dom  # the grid read the results and drew the benchmark
        graph = _dom(tmp_path, url + "#bench_tiny.track_answer")
        assert FAILED not in graph and "testbox" in graph  # the graph page too, with its machine
    finally:
        server.shutdown()
        server.server_close()
