"""Model-zoo downloads and loading against a real HTTP server on 127.0.0.1: resume, sha256, offline, mirrors."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hub_fixtures import allow_stand_in_weights

from ssl_distill import hub
from ssl_distill.cli import main
from ssl_distill.hub import HubError, ModelEntry
from ssl_distill.hub.download import download_url
from ssl_distill.models import VisionTransformer
from ssl_distill.train.checkpoint import save_checkpoint

TINY_ARCH = dict(patch_size=14, img_size=28, embed_dim=32, depth=2, num_heads=2, init_values=1.0)


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range`` unless told not to; can drop a transfer halfway."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if srv.types.get(self.path):
            self.send_header("Content-Type", srv.types[self.path])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        time.sleep(srv.delay)
        if srv.drops.get(self.path, 0) > 0:  # promise everything, send half, hang up
            srv.drops[self.path] -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class Server:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.files, self.httpd.requests, self.httpd.drops, self.httpd.types = {}, [], {}, {}
        self.httpd.honour_range = True
        self.httpd.delay = 0.0
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes, drops: int = 0, content_type: str | None = None) -> str:
        self.httpd.files[path] = data
        self.httpd.drops[path] = drops
        self.httpd.types[path] = content_type
        return self.base + path

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.httpd.requests


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    thread = threading.Thread(target=s.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSL_DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSL_DISTILL_BASE_URL", raising=False)
    monkeypatch.delenv("SSL_DISTILL_OFFLINE", raising=False)
    return tmp_path / "home" / "checkpoints"


def tiny_model(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY_ARCH, **kw}).eval()


def to_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tiny_entry(base: str, sha256: str | None = None, **kw) -> ModelEntry:
    return ModelEntry(name="tiny_test", arch="vit_small", arch_kwargs={**TINY_ARCH, **kw},
                      path="tiny/tiny_pretrain.pth", sha256=sha256, license="Apache-2.0", params=0, base_url=base)


def assert_same_weights(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ downloads
def test_interrupted_transfer_resumes_with_range(server: Server, tmp_path: Path) -> None:
    data = bytes(range(256)) * 400
    url = server.add("/f.bin", data, drops=1)
    dest = download_url(url, tmp_path / "f.bin")
    assert dest.read_bytes() == data
    assert not (tmp_path / "f.bin.partial").exists()
    assert server.requests == [("/f.bin", None), ("/f.bin", f"bytes={len(data) // 2}-")]


def test_next_run_resumes_a_partial_file(server: Server, tmp_path: Path) -> None:
    data = hashlib.sha256(b"x").digest() * 3000
    url = server.add("/g.bin", data, drops=1)
    with pytest.raises(HubError, match="interrupted") as err:
        download_url(url, tmp_path / "g.bin", retries=0)
    assert "bytes kept" in str(err.value)
    partial = tmp_path / "g.bin.partial"
    assert partial.read_bytes() == data[: len(data) // 2]
    assert not (tmp_path / "g.bin").exists()
    download_url(url, tmp_path / "g.bin", sha256=hashlib.sha256(data).hexdigest())
    assert (tmp_path / "g.bin").read_bytes() == data
    assert not partial.exists()
    assert server.requests[-1] == ("/g.bin", f"bytes={len(data) // 2}-")


def test_server_ignoring_range_restarts_the_file(server: Server, tmp_path: Path) -> None:
    data = b"abcdefgh" * 1000
    server.httpd.honour_range = False
    (tmp_path / "h.bin.partial").write_bytes(b"garbage")
    download_url(server.add("/h.bin", data), tmp_path / "h.bin")
    assert (tmp_path / "h.bin").read_bytes() == data


def test_concurrent_downloads_of_one_file_fetch_it_once(server: Server, tmp_path: Path) -> None:
    data = b"0123456789" * 5000
    url = server.add("/shared.bin", data)
    server.httpd.delay = 0.3  # the first download is still running when the second starts
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            download_url(url, tmp_path / "shared.bin")
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / "shared.bin").read_bytes() == data
    assert server.requests == [("/shared.bin", None)]


def test_checksum_mismatch_deletes_and_fails(server: Server, tmp_path: Path) -> None:
    url = server.add("/c.bin", b"payload" * 100)
    with pytest.raises(HubError, match="fails verification.*its sha256 is [0-9a-f]{64}, expected 0{64}.*deleted"):
        download_url(url, tmp_path / "c.bin", sha256="0" * 64)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_http_error_and_unreachable_server(server: Server, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="HTTP 404"):
        download_url(server.base + "/missing.pth", tmp_path / "m.pth")
    dead = f"http://127.0.0.1:{_free_port()}/x/w.pth"
    with pytest.raises(HubError, match=r"network error.*copy it to .*w\.pth"):
        download_url(dead, tmp_path / "w.pth", timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_progress_bar_when_forced(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    download_url(server.add("/p.bin", b"z" * 5000), tmp_path / "p.bin", progress=True)
    assert "100%" in capsys.readouterr().err
    download_url(server.add("/q.bin", b"z" * 5000), tmp_path / "q.bin")  # not a TTY: silent
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- loading
def test_load_entry_downloads_verifies_and_caches(server: Server, isolated_cache: Path) -> None:
    ref = tiny_model(1)
    data = to_bytes(ref.state_dict())
    server.add("/zoo/tiny/tiny_pretrain.pth", data)
    entry = tiny_entry(server.base + "/zoo", sha256=hashlib.sha256(data).hexdigest())
    model = hub.load(entry)
    assert_same_weights(model, ref)
    assert not model.training
    assert (isolated_cache / "tiny_pretrain.pth").read_bytes() == data
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    server.httpd.shutdown()  # cache hit: no network needed any more
    assert_same_weights(hub.load(entry), ref)
    assert len(server.requests) == 1


def test_load_with_bad_sha256_fails_and_leaves_no_file(server: Server, isolated_cache: Path) -> None:
    server.add("/zoo/tiny/tiny_pretrain.pth", to_bytes(tiny_model().state_dict()))
    with pytest.raises(HubError, match="fails verification.*its sha256 is"):
        hub.load(tiny_entry(server.base + "/zoo", sha256="ab" * 32))
    assert [p.name for p in isolated_cache.iterdir()] == ["tiny_pretrain.pth.lock"]


def test_weights_url_path_and_training_checkpoint(server: Server, tmp_path: Path) -> None:
    teacher, student = tiny_model(1), tiny_model(2)
    entry = tiny_entry("http://unused.invalid")
    url = server.add("/any/name.pth", to_bytes(teacher.state_dict()))
    assert_same_weights(hub.load(entry, weights=url), teacher)
    model_sd = {**{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
                **{f"student.backbone.{k}": v for k, v in student.state_dict().items()}}
    ckpt = save_checkpoint(tmp_path / "run", {"iteration": 7, "model": model_sd})
    assert_same_weights(hub.load(entry, weights=ckpt), teacher)  # the teacher, not the student
    plain = tmp_path / "plain.pth"
    torch.save(student.state_dict(), plain)
    assert_same_weights(hub.load(entry, weights=str(plain)), student)
    # same basename at another URL is another file, not a cache hit
    other = server.add("/other/name.pth", to_bytes(student.state_dict()))
    assert_same_weights(hub.load(entry, weights=other), student)
    assert_same_weights(hub.load(entry, weights=url), teacher)


def test_reference_training_file_with_chunked_blocks(tmp_path: Path) -> None:
    """facebookresearch/dinov2 teacher_checkpoint.pth: {"teacher": {"backbone.blocks.<chunk>.<i>.*", heads}}."""
    ref = tiny_model(4)
    chunked = {}
    for k, v in ref.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i}.{i}." + k.split(".", 2)[2]  # 2 chunks of 1 block (chunk 1 = [Identity, block 1])
        chunked["backbone." + k] = v
    chunked["dino_head.last_layer.weight_g"] = torch.ones(8, 1)
    torch.save({"teacher": chunked}, tmp_path / "teacher_checkpoint.pth")
    assert_same_weights(hub.load(tiny_entry("http://unused.invalid"), weights=tmp_path / "teacher_checkpoint.pth"), ref)


def test_wrong_files_are_clear_errors(server: Server, tmp_path: Path) -> None:
    entry = tiny_entry("http://unused.invalid")
    html = server.add("/page.pth", b"<html><body>Please log in</body></html>")
    with pytest.raises(HubError, match="page.pth fails verification.*not a weights file.*<html><body>Please.*nothing "
                                       "was cached.*a login or error page"):
        hub.load(entry, weights=html)
    with pytest.raises(HubError, match="does not exist"):
        hub.load(entry, weights=tmp_path / "nope.pth")
    other = tmp_path / "other.pth"
    torch.save(tiny_model(num_register_tokens=2).state_dict(), other)
    with pytest.raises(HubError, match=r"do not fit.*unexpected keys \(1\): \['register_tokens'\].*not tiny_test's"):
        hub.load(entry, weights=other)
    junk = tmp_path / "junk.pth"
    torch.save({"optimizer": {"lr": 0.1}}, junk)
    with pytest.raises(HubError, match="holds no state dict of tensors"):
        hub.load(entry, weights=junk)


# ----------------------------------------------------------------------------- offline, mirrors, CLI
def test_offline_uses_cache_or_says_what_to_download_where(server: Server, isolated_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tiny_model(3)
    server.add("/zoo/tiny/tiny_pretrain.pth", to_bytes(ref.state_dict()))
    entry = tiny_entry(server.base + "/zoo")
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")
    with pytest.raises(HubError) as err:
        hub.load(entry)
    msg = str(err.value)
    assert "SSL_DISTILL_OFFLINE=1" in msg
    assert f"{server.base}/zoo/tiny/tiny_pretrain.pth" in msg
    assert str(isolated_cache / "tiny_pretrain.pth") in msg
    assert server.requests == []
    isolated_cache.mkdir(parents=True)
    torch.save(ref.state_dict(), isolated_cache / "tiny_pretrain.pth")  # the user copies the file in
    assert_same_weights(hub.load(entry), ref)
    assert server.requests == []


def test_base_url_mirror_keeps_official_relative_paths(server: Server, isolated_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    allow_stand_in_weights(monkeypatch)
    stand_in = to_bytes({"stand_in": torch.zeros(2)})
    server.add("/mirror/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth", stand_in)
    monkeypatch.setenv("SSL_DISTILL_BASE_URL", server.base + "/mirror/dinov2/")
    path = hub.download("dinov2_vits14")
    assert path == isolated_cache / "dinov2_vits14_pretrain.pth"
    assert path.read_bytes() == stand_in
    assert server.requests == [("/mirror/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth", None)]


def test_cli_download_to_dest(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    allow_stand_in_weights(monkeypatch)
    data = to_bytes({"registers": torch.ones(50)})
    server.add("/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth", data)
    monkeypatch.setenv("SSL_DISTILL_BASE_URL", server.base)
    assert main(["download", "dinov2_vitb14_reg", "--dest", str(tmp_path / "w"), "--sha256", "-q"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "w" / "dinov2_vitb14_reg4_pretrain.pth").read_bytes() == data
    assert hashlib.sha256(data).hexdigest() in out
    assert "dinov2_vitb14_reg4_pretrain.pth" in out
    assert main(["download", "dinov2_vitb14_regs"]) == 2
    assert "did you mean 'dinov2_vitb14_reg'" in capsys.readouterr().err.lower()
    assert main(["download", "dinov2_vitl14"]) == 2  # not on the mirror
    assert "HTTP 404" in capsys.readouterr().err


def test_official_name_loads_full_size_weights_from_mirror(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    ref = hub.load("dinov2_vits14_reg", pretrained=False)
    with torch.no_grad():
        ref.register_tokens.normal_()
    server.add("/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth", to_bytes(ref.state_dict()))
    monkeypatch.setenv("SSL_DISTILL_BASE_URL", server.base)
    model = hub.load("dinov2_vits14_reg")
    assert_same_weights(model, ref)
    assert model.num_register_tokens == 4
    assert model.interpolate_antialias
    assert model.interpolate_offset == 0.0


# ----------------------------------------------------------------------------- verification before and in the cache
def test_short_or_corrupt_downloads_never_enter_the_cache(server: Server, tmp_path: Path) -> None:
    good = to_bytes(tiny_model().state_dict())
    short = server.add("/short.pth", good[: len(good) // 3])  # a consistent Content-Length: only the size floor tells
    with pytest.raises(HubError, match=rf"fails verification \(it is {len(good) // 3} bytes, shorter than the "
                                       rf"{len(good)} bytes.*nothing was cached"):
        download_url(short, tmp_path / "a.pth", min_size=len(good))
    with pytest.raises(HubError, match=rf"it is {len(good)} bytes, the registry records {len(good) + 1}"):
        download_url(server.add("/exact.pth", good), tmp_path / "b.pth", size=len(good) + 1)
    data_at = good.index(b"PK\x03\x04", good.index(b"/data/0") - 64)  # a byte inside a tensor's record
    corrupt = bytearray(good)
    corrupt[data_at + 200] ^= 0xFF
    with pytest.raises(HubError, match="fails its CRC check"):
        download_url(server.add("/corrupt.pth", bytes(corrupt)), tmp_path / "c.pth")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    path = download_url(server.add("/ok.pth", good), tmp_path / "ok.pth", min_size=len(good), size=len(good))
    assert path.read_bytes() == good
    record = json.loads((tmp_path / "ok.pth.verified").read_text())
    assert record == {"size": len(good), "sha256": hashlib.sha256(good).hexdigest(), "url": server.base + "/ok.pth",
                      "mtime_ns": path.stat().st_mtime_ns}


def test_a_cached_file_that_fails_verification_is_downloaded_again(server: Server, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    good = to_bytes(tiny_model().state_dict())
    url = server.add("/w.pth", good)
    dest = download_url(url, tmp_path / "w.pth")
    dest.write_bytes(good[:-10])  # damaged in the cache (a full disk, a bad copy)
    assert download_url(url, dest).read_bytes() == good
    assert [p for p, _ in server.requests] == ["/w.pth", "/w.pth"]
    copied = tmp_path / "copied.pth"  # copied in by hand (no record): its zip directory is checked
    copied.write_bytes(good[: len(good) // 2])
    assert download_url(url, copied).read_bytes() == good
    dest.write_bytes(good[:-10])
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")
    with pytest.raises(HubError, match=r"the cached .*w.pth fails verification \(it is .* bytes, but had "
                                       rf"{len(good)}.*SSL_DISTILL_OFFLINE=1 forbids"):
        download_url(url, dest)


# ----------------------------------------------------------------------------- verification on use (issue 26, item 6)
def _flip_a_tensor_byte(path: Path, keep_mtime: bool) -> None:
    """Bit rot: one byte inside a tensor's data changes, the size stays (and, with ``keep_mtime``, the mtime)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[data.index(b"/data/0") + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_bit_rot_in_the_cache_is_found_on_use(server: Server, isolated_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tiny_model(5)
    server.add("/zoo/tiny/tiny_pretrain.pth", to_bytes(ref.state_dict()))
    entry = tiny_entry(server.base + "/zoo")  # no sha256 in the registry: only the record knows it
    assert_same_weights(hub.load(entry), ref)
    cached = isolated_cache / "tiny_pretrain.pth"
    assert json.loads((isolated_cache / "tiny_pretrain.pth.verified").read_text())["mtime_ns"] == \
        cached.stat().st_mtime_ns
    _flip_a_tensor_byte(cached, keep_mtime=True)
    assert_same_weights(hub.load(entry), ref)  # found by the hash, downloaded again: the model is the original
    assert len(server.requests) == 2
    _flip_a_tensor_byte(cached, keep_mtime=True)
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")
    with pytest.raises(HubError, match=r"the cached .*tiny_pretrain.pth fails verification \(its sha256 is [0-9a-f]{64}"
                                       r", not the [0-9a-f]{64} recorded when it was downloaded.*OFFLINE=1 forbids"):
        hub.load(entry)


def test_large_cached_files_are_rehashed_only_when_changed(server: Server, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dl = importlib.import_module("ssl_distill.hub.download")  # the module (ssl_distill.hub.download is a function)

    good = to_bytes(tiny_model().state_dict())
    url = server.add("/big.pth", good)
    dest = download_url(url, tmp_path / "big.pth", weights=True)
    monkeypatch.setattr(dl, "ALWAYS_HASH_BYTES", 0)  # every file counts as large
    hashed: list[Path] = []
    monkeypatch.setattr(dl, "sha256_file", lambda p, real=dl.sha256_file: hashed.append(Path(p)) or real(p))
    download_url(url, dest, weights=True)
    assert hashed == []  # unchanged size and mtime: trusted without reading the file
    _flip_a_tensor_byte(dest, keep_mtime=False)  # written in place: the mtime moves
    assert download_url(url, dest, weights=True).read_bytes() == good
    assert [p for p, _ in server.requests] == ["/big.pth", "/big.pth"]


def test_a_garbage_record_is_repaired_and_a_copied_file_checked(server: Server, tmp_path: Path) -> None:
    good = to_bytes(tiny_model().state_dict())
    url = server.add("/r.pth", good)
    dest = download_url(url, tmp_path / "r.pth", weights=True)
    record = tmp_path / "r.pth.verified"
    for garbage in ("{not json", '{"size": "many", "sha256": 7}'):
        record.write_text(garbage)
        assert download_url(url, dest, weights=True) == dest
        assert json.loads(record.read_text())["sha256"] == hashlib.sha256(good).hexdigest()  # rewritten
    assert len(server.requests) == 1
    record.write_text("{not json")  # an unreadable record does not hide bit rot when the sha256 is known
    _flip_a_tensor_byte(dest, keep_mtime=True)
    assert download_url(url, dest, hashlib.sha256(good).hexdigest(), weights=True).read_bytes() == good
    copied = tmp_path / "copied.pth"  # copied in by hand, same size, wrong content: the expected sha256 tells
    copied.write_bytes(to_bytes(tiny_model(seed=9).state_dict()))
    assert download_url(url, copied, hashlib.sha256(good).hexdigest(), weights=True).read_bytes() == good


def test_an_html_page_never_enters_the_cache(server: Server, isolated_cache: Path, tmp_path: Path) -> None:
    page = server.add("/weights/model.pth", b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>",
                      content_type="text/html; charset=utf-8")
    with pytest.raises(HubError, match=r"fails verification \(it is not a weights file .*starts with "
                                       r"'<!DOCTYPE html>'; the server sent it as text/html\).*nothing was cached"):
        hub.load(tiny_entry("http://unused.invalid"), weights=page)
    assert [p.name for p in (isolated_cache / "urls").iterdir() if not p.name.endswith(".lock")] == []
    tensors = {"w": torch.arange(6.0)}
    legacy = io.BytesIO()
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    from safetensors.torch import save as safetensors_bytes

    for name, data in (("zip.pth", to_bytes(tensors)), ("legacy.pth", legacy.getvalue()),
                       ("st.safetensors", safetensors_bytes(tensors))):
        path = download_url(server.add(f"/{name}", data, content_type="application/octet-stream"),
                            tmp_path / name, weights=True)
        assert path.read_bytes() == data, name
