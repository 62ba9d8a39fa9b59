"""tools/bench fetches the pyfuse3 sdist (its Python references) straight
from a package index's simple API: both forms of the API (PEP 691 JSON,
PEP 503 HTML), the sha256 check, and a one-line BenchError -- never a
traceback -- for every way it can fail.  Served by a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from bench_lib import systems  # noqa: E402
from bench_lib.util import BenchError  # noqa: E402

SDIST = b"not really a tarball, but bytes with a known sha256"
NAME = "demo-1.0.tar.gz"


class _Index(http.server.BaseHTTPRequestHandler):
    form = "json"
    digest = hashlib.sha256(SDIST).hexdigest()

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/simple/demo/":
            if self.form == "json":
                body = json.dumps({"files": [
                    {"filename": "demo-0.9.tar.gz", "url": "../../files/old", "hashes": {}},
                    {"filename": NAME, "url": "../../files/demo?x=1&y=2",
                     "hashes": {"sha256": self.digest}}]}).encode()
                ctype = "application/vnd.pypi.simple.v1+json"
            else:
                body = (f'<html><body><a href="../../files/demo?x=1&amp;y=2#sha256='
                        f'{self.digest}" data-requires-python="&gt;=3.8">{NAME}</a>'
                        f'</body></html>').encode()
                ctype = "text/html"
        elif self.path == "/files/demo?x=1&y=2":
            body, ctype = SDIST, "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def index(monkeypatch):
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Index)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{srv.server_port}/simple/")
    try:
        yield _Index
    finally:
        srv.shutdown()
        srv.server_close()
        _Index.form = "json"
        _Index.digest = hashlib.sha256(SDIST).hexdigest()


@pytest.mark.parametrize("form", ["json", "html"])
def test_sdist_from_either_form_of_the_simple_api(index, tmp_path, form):
    index.form = form
    dest = tmp_path / NAME
    systems._download_sdist("demo", "1.0", str(dest))
    assert dest.read_bytes() == SDIST
    assert not (tmp_path / (NAME + ".part")).exists()


def test_sdist_with_a_wrong_sha256_is_refused_and_not_kept(index, tmp_path):
    index.digest = "0" * 64
    dest = tmp_path / NAME
    with pytest.raises(BenchError, match="does not match its sha256"):
        systems._download_sdist("demo", "1.0", str(dest))
    assert not dest.exists()


def test_missing_version_and_unreachable_index_are_one_line_errors(index, tmp_path,
                                                                    monkeypatch):
    with pytest.raises(BenchError, match="lists no demo-2.0.tar.gz"):
        systems._download_sdist("demo", "2.0", str(tmp_path / "x"))
    with pytest.raises(BenchError, match="could not download"):
        systems._download_sdist("nothere", "1.0", str(tmp_path / "y"))  # 404
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens
    with pytest.raises(BenchError, match="could not download.*refused"):
        systems._download_sdist("demo", "1.0", str(tmp_path / "z"))
    assert os.listdir(tmp_path) == []
