"""pretrained=True over a real HTTP server on 127.0.0.1: success, mirror, hash mismatch, truncation, 404;
resumed downloads (HTTP Range, a server that ignores it, a killed downloader) and one download for many processes."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bit_zoo
from bit_zoo.weights.loading import model_state
from bit_zoo.weights.pretrained import Weights, cache_dir, download_weights, resolve_url, sha256_file


def cache_files():
    root = cache_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def served_r50(weights_server, npz_r50_1000):
    path, params = npz_r50_1000
    weights_server.routes["/mirror/BiT-S-R50x1.npz"] = ("ok", path.read_bytes())
    return params


def test_pretrained_downloads_from_mirror_verifies_and_loads(monkeypatch, weights_server, served_r50):
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/mirror/")
    assert resolve_url(bit_zoo.get_weights("bit_s_r50x1")) == weights_server.base_url + "/mirror/BiT-S-R50x1.npz"
    model = bit_zoo.create_model("bit_s_r50x1", pretrained=True, num_classes=10)
    state = model_state(model)
    np.testing.assert_array_equal(state["stem.conv.weight"], served_r50["stem.conv.weight"])
    assert not state["head.fc.weight"].any()
    assert cache_files() == ["BiT-S-R50x1.npz"]
    # the second call is served from the cache: no new request
    hits = len(weights_server.hits)
    bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert len(weights_server.hits) == hits


def test_cache_location_follows_bit_zoo_home(monkeypatch, tmp_path, weights_server, served_r50):
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/mirror")
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "elsewhere"))
    bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert (tmp_path / "elsewhere" / "weights" / "BiT-S-R50x1.npz").is_file()


def test_404_names_the_url_and_the_mirror_setting(monkeypatch, weights_server):
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/empty/")
    with pytest.raises(RuntimeError, match=r"HTTP 404.*/empty/BiT-M-R50x1\.npz(.|\n)*BIT_ZOO_BASE_URL"):
        bit_zoo.create_model("bit_m_r50x1", pretrained=True)
    assert cache_files() == []


def test_truncated_download_is_kept_then_redone_by_a_server_without_ranges(monkeypatch, weights_server, npz_r50_1000):
    """The conftest server ignores Range: the second call gets status 200 and starts again from byte 0."""
    path, _ = npz_r50_1000
    body = path.read_bytes()
    weights_server.routes["/trunc/BiT-S-R50x1.npz"] = ("truncate", body)
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/trunc/")
    with pytest.raises(RuntimeError, match=r"truncated: got \d+ of \d+ bytes.*call again to resume") as error:
        bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert "BIT_ZOO_BASE_URL" not in str(error.value)  # the mirror answered: no advice to set it
    assert cache_files() == [".BiT-S-R50x1.npz.part.url", "BiT-S-R50x1.npz.part"]
    assert (cache_dir() / "BiT-S-R50x1.npz.part").stat().st_size == len(body) // 2
    weights_server.routes["/trunc/BiT-S-R50x1.npz"] = ("ok", body)
    bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert cache_files() == ["BiT-S-R50x1.npz"] and (cache_dir() / "BiT-S-R50x1.npz").read_bytes() == body


def test_wrong_file_at_the_url_fails_the_structure_check(monkeypatch, weights_server, npz_r50_1000):
    path, _ = npz_r50_1000  # an R50 file where the R101 file should be
    weights_server.routes["/wrong/BiT-S-R101x1.npz"] = ("ok", path.read_bytes())
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/wrong/")
    with pytest.raises(ValueError, match=r"downloaded from http://127\.0\.0\.1:\d+/wrong/BiT-S-R101x1\.npz.*missing keys"):
        bit_zoo.create_model("bit_s_r101x1", pretrained=True)
    assert cache_files() == []


def test_mindcv_hash_prefix_checked(monkeypatch, tmp_path, weights_server, make_mindcv_ckpt):
    src = tmp_path / "src.ckpt"
    make_mindcv_ckpt(src, "bit_s_r50x1")
    weights = bit_zoo.get_weights("bit_s_r50x1.mindcv_in1k")
    weights_server.routes[f"/ms/{weights.filename}"] = ("ok", src.read_bytes())
    monkeypatch.setenv("BIT_ZOO_MINDCV_BASE_URL", weights_server.base_url + "/ms/")
    # the real file's prefix is 1e4795a4; ours hashes differently, so this is a mismatch
    with pytest.raises(RuntimeError, match=r"sha256 mismatch.*expected 1e4795a4"):
        bit_zoo.create_model("bit_s_r50x1.mindcv_in1k", pretrained=True)
    assert cache_files() == []
    matching = dataclasses.replace(weights, sha256_prefix=sha256_file(src)[:8])
    got = download_weights(matching)
    assert got.read_bytes() == src.read_bytes()
    assert cache_files() == [weights.filename]


def test_corrupt_cached_file_is_reported_not_silently_used(monkeypatch, weights_server):
    target = cache_dir() / "BiT-M-R50x1.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")  # what mindcv 0.3 leaves after a failed download
    with pytest.raises(ValueError, match="empty"):
        bit_zoo.create_model("bit_m_r50x1", pretrained=True)


# ------------------------------------------------------------------------ resume, kill, one download per job

ROOT = Path(__file__).resolve().parents[1]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` slowly (chunk by chunk); honours Range unless `ranges` is off; `cut_at` hangs up once after that many bytes."""

    files: dict[str, bytes] = {}
    hits: list[tuple[str, str | None, int]] = []  # (path, Range header, bytes sent)
    settings: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        requested = self.headers.get("Range")
        start = 0
        if requested and self.settings.get("ranges", True):
            start = int(requested.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        sent, chunk = 0, self.settings.get("chunk", 1 << 16)
        cut_at = self.settings.pop("cut_at", None)
        try:
            for offset in range(start, len(body), chunk):
                piece = body[offset : offset + chunk]
                if cut_at is not None and sent + len(piece) > cut_at:
                    self.wfile.write(piece[: cut_at - sent])
                    sent = cut_at
                    self.close_connection = True
                    return
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                time.sleep(self.settings.get("delay", 0.0))
        except (BrokenPipeError, ConnectionResetError):  # the client was killed
            pass
        finally:
            self.hits.append((self.path, requested, sent))

    def log_message(self, *args):
        pass


@pytest.fixture
def range_server():
    _RangeHandler.files, _RangeHandler.hits, _RangeHandler.settings = {}, [], {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/files/"
    server.handler = _RangeHandler
    yield server
    server.shutdown()
    server.server_close()


def _blob_weights(base_url: str, body: bytes) -> Weights:
    return Weights(
        filename="blob.bin",
        base_url=base_url,
        file_format="npz",
        layers=(1, 1, 1, 1),
        width_factor=1,
        num_classes=1,
        input_size=1,
        num_params=0,
        dataset="none",
        description="test file",
        source="tests",
        sha256=hashlib.sha256(body).hexdigest(),
    )


_DOWNLOAD_SCRIPT = """
import sys, time
from pathlib import Path
from bit_zoo.weights.pretrained import Weights, download_weights
go = Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
w = Weights(filename="blob.bin", base_url=sys.argv[1], file_format="npz", layers=(1, 1, 1, 1), width_factor=1, num_classes=1, input_size=1, num_params=0,
            dataset="none", description="test file", source="tests", sha256=sys.argv[2])
print(download_weights(w, progress=False))
"""


def _downloader(server, body: bytes, go: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sha = hashlib.sha256(body).hexdigest()
    cmd = [sys.executable, "-c", _DOWNLOAD_SCRIPT, server.base_url, sha, str(go)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interrupted_download_resumes_with_a_range_request(range_server):
    body = np.random.default_rng(0).bytes(1 << 20)
    range_server.handler.files["/files/blob.bin"] = body
    range_server.handler.settings.update(cut_at=300_000)
    weights = _blob_weights(range_server.base_url, body)
    with pytest.raises(RuntimeError, match=r"interrupted after 300000 of 1048576 bytes|truncated: got 300000 of 1048576"):
        download_weights(weights, progress=False)
    assert download_weights(weights, progress=False).read_bytes() == body
    assert [(h[1], h[2]) for h in range_server.handler.hits] == [(None, 300_000), ("bytes=300000-", len(body) - 300_000)]
    assert cache_files() == ["blob.bin"]  # partial file, URL note and lock file are gone


def test_partial_file_of_another_url_is_not_resumed(range_server):
    body = np.random.default_rng(1).bytes(200_000)
    range_server.handler.files["/files/blob.bin"] = body
    (cache_dir()).mkdir(parents=True)
    (cache_dir() / "blob.bin.part").write_bytes(b"x" * 1000)
    (cache_dir() / ".blob.bin.part.url").write_text("http://elsewhere.invalid/blob.bin\n")
    assert download_weights(_blob_weights(range_server.base_url, body), progress=False).read_bytes() == body
    assert range_server.handler.hits[0][1] is None  # started from byte 0


def test_stale_partial_of_a_dead_process_is_removed(range_server):
    body = b"abc" * 1000
    range_server.handler.files["/files/blob.bin"] = body
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache_dir().mkdir(parents=True)
    (cache_dir() / f"blob.bin.part{dead.pid}").write_bytes(b"old")  # the pre-resume naming, from a killed process
    download_weights(_blob_weights(range_server.base_url, body), progress=False)
    assert cache_files() == ["blob.bin"]


def test_killed_download_is_resumed_by_the_next_process(range_server, tmp_path):
    body = np.random.default_rng(2).bytes(2 << 20)
    range_server.handler.files["/files/blob.bin"] = body
    range_server.handler.settings.update(chunk=1 << 16, delay=0.02)
    go = tmp_path / "go"
    go.touch()
    proc = _downloader(range_server, body, go)
    assert proc.stdout.readline().strip() == "ready"
    part = cache_dir() / "blob.bin.part"
    deadline = time.time() + 120
    while (not part.exists() or part.stat().st_size < 400_000) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = part.stat().st_size
    assert 400_000 <= kept < len(body)
    range_server.handler.settings.update(delay=0.0)
    assert download_weights(_blob_weights(range_server.base_url, body), progress=False).read_bytes() == body
    # A hit is recorded when its handler ends: the killed client's handler may only notice the
    # broken pipe after the resumed transfer has finished, so pick the ranged request by its header.
    ranged = [h for h in range_server.handler.hits if h[1] is not None]
    assert [(h[1], h[2]) for h in ranged] == [(f"bytes={kept}-", len(body) - kept)]
    assert cache_files() == ["blob.bin"]


def test_two_processes_download_once(range_server, tmp_path):
    """Ranks of one job (or nodes sharing the cache dir) start together: one GET, both get the verified file."""
    body = np.random.default_rng(3).bytes(1 << 20)
    range_server.handler.files["/files/blob.bin"] = body
    range_server.handler.settings.update(chunk=1 << 15, delay=0.03)  # ~1 s: the second process waits on the lock
    go = tmp_path / "go"
    procs = [_downloader(range_server, body, go) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both imported bit_zoo: start together
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert {o[0].strip() for o in outputs} == {str(cache_dir() / "blob.bin")}
    assert len(range_server.handler.hits) == 1
    assert (cache_dir() / "blob.bin").read_bytes() == body and cache_files() == ["blob.bin"]


def test_waiting_for_a_stuck_downloader_times_out(monkeypatch, range_server, tmp_path):
    body = b"x" * 1000
    range_server.handler.files["/files/blob.bin"] = body
    cache_dir().mkdir(parents=True)
    lock = cache_dir() / ".blob.bin.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, time; f = open({str(lock)!r}, 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "f.write('process 1 on nodeX'); f.flush(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("BIT_ZOO_DOWNLOAD_WAIT", "1")
        with pytest.raises(RuntimeError, match=r"waited 1 s for process 1 on nodeX to download blob\.bin .*BIT_ZOO_DOWNLOAD_WAIT"):
            download_weights(_blob_weights(range_server.base_url, body), progress=False)
        assert range_server.handler.hits == []
    finally:
        holder.kill()
        holder.wait()
    assert download_weights(_blob_weights(range_server.base_url, body), progress=False).read_bytes() == body  # lock freed by death
