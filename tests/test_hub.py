"""Downloads against a real HTTP server on 127.0.0.1, so urllib's own failure modes are what is tested."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import socket
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from shufflenetv2 import hub
from shufflenetv2.errors import DownloadError

from .conftest import REPO

PAYLOAD = bytes(range(256)) * 64 + b"shufflenetv2"
PREFIX = hashlib.sha256(PAYLOAD).hexdigest()[:8]
OTHER = b"not the file you are looking for" * 100


class _Server:
    """Routes ``path -> (mode, body)``; ``mode`` is "ok", "short" (drops the connection) or "hang"."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                mode, body = server.routes.get(self.path, ("missing", b""))
                if mode == "missing":
                    self.send_error(404)
                    return
                if mode == "hang":
                    server.release.wait(5)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                # "short" promises more bytes than it sends, then closes: a connection dropped mid-transfer
                self.send_header("Content-Length", str(len(body) + (4096 if mode == "short" else 0)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02})
        self.thread.daemon = True

    def serve(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.routes[path] = (mode, body)
        return self.base + path


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(5)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SHUFFLENETV2_HOME", str(cache))
    monkeypatch.delenv("SHUFFLENETV2_PRETRAINED_BASE_URL", raising=False)
    return cache


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_hash_prefix_from_url() -> None:
    for name, url in hub.PRETRAINED_URLS.items():
        assert url.startswith("https://download.mindspore.cn/toolkits/mindcv/shufflenet/shufflenetv2/")
        assert Path(url).name.startswith(name + "-")
        assert hub.hash_prefix_from_url(url) == Path(url).stem.split("-")[1]
    assert hub.hash_prefix_from_url("https://h/x/shufflenet_v2_x0_5-8c841061.ckpt") == "8c841061"
    assert hub.hash_prefix_from_url("https://h/x/model-39D05BB6-910v2.ckpt") == "39d05bb6"
    assert hub.hash_prefix_from_url("https://h/x/model-39d05bb6.ckpt?download=1") == "39d05bb6"
    assert hub.hash_prefix_from_url("https://h/x/model.ckpt") is None
    assert hub.hash_prefix_from_url("https://h/x/model-1234.ckpt") is None
    assert hub.hash_prefix_from_url("https://h/x-deadbeef/model.ckpt") is None


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHUFFLENETV2_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path
    monkeypatch.delenv("SHUFFLENETV2_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "shufflenetv2"


def test_download_good_file_then_cached(server: _Server, home: Path) -> None:
    url = server.serve(f"/w/model-{PREFIX}.ckpt", PAYLOAD)
    path = hub.download(url)
    assert path == home / f"model-{PREFIX}.ckpt"
    assert path.read_bytes() == PAYLOAD
    assert _listing(home) == [path.name]
    assert server.hits[f"/w/model-{PREFIX}.ckpt"] == 1
    assert hub.download(url) == path
    assert server.hits[f"/w/model-{PREFIX}.ckpt"] == 1


def test_explicit_prefix_and_dest(server: _Server, tmp_path: Path) -> None:
    url = server.serve("/plain.bin", PAYLOAD)
    dest = tmp_path / "sub" / "dir" / "weights.bin"
    assert hub.download(url, dest, expected_sha256_prefix=PREFIX.upper(), progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _listing(dest.parent) == ["weights.bin"]


def test_wrong_hash_is_refused_and_removed(server: _Server, home: Path) -> None:
    url = server.serve(f"/w/model-{PREFIX}.ckpt", OTHER)
    with pytest.raises(DownloadError) as info:
        hub.download(url)
    message = str(info.value)
    assert PREFIX in message
    assert hashlib.sha256(OTHER).hexdigest() in message
    assert "removed" in message
    assert _listing(home) == []


def test_failed_download_keeps_existing_good_file(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.ckpt"
    dest.write_bytes(PAYLOAD)
    bad = server.serve("/w/other-0123abcd.ckpt", OTHER)
    dropped = server.serve("/w/dropped-0123abcd.ckpt", OTHER, mode="short")
    missing = server.base + "/w/missing-0123abcd.ckpt"
    for url in (bad, dropped, missing):
        with pytest.warns(UserWarning, match="downloading it again"), pytest.raises(DownloadError):
            hub.download(url, dest)
        assert dest.read_bytes() == PAYLOAD
        assert _listing(tmp_path) == ["weights.ckpt"]


def test_corrupt_cached_file_is_downloaded_again(server: _Server, home: Path) -> None:
    url = server.serve(f"/w/model-{PREFIX}.ckpt", PAYLOAD)
    home.mkdir(parents=True)
    (home / f"model-{PREFIX}.ckpt").write_bytes(PAYLOAD[:100])
    with pytest.warns(UserWarning, match="downloading it again"):
        path = hub.download(url)
    assert path.read_bytes() == PAYLOAD
    assert server.hits[f"/w/model-{PREFIX}.ckpt"] == 1
    assert _listing(home) == [path.name]


def test_connection_dropped_mid_transfer(server: _Server, home: Path) -> None:
    url = server.serve(f"/w/model-{PREFIX}.ckpt", PAYLOAD, mode="short")
    with pytest.raises(DownloadError, match="dropped") as info:
        hub.download(url)
    assert url in str(info.value)
    assert _listing(home) == []


def test_dropped_connection_detected_without_hash(server: _Server, tmp_path: Path) -> None:
    url = server.serve("/plain.bin", PAYLOAD, mode="short")
    with pytest.raises(DownloadError, match=f"{len(PAYLOAD)} of {len(PAYLOAD) + 4096} bytes"):
        hub.download(url, tmp_path / "plain.bin", expected_sha256_prefix="")
    assert _listing(tmp_path) == []


def test_404_names_url_and_cache_path(server: _Server, home: Path) -> None:
    url = server.base + f"/w/model-{PREFIX}.ckpt"
    with pytest.raises(DownloadError) as info:
        hub.download(url)
    message = str(info.value)
    assert url in message
    assert "404" in message
    assert str(home / f"model-{PREFIX}.ckpt") in message
    assert "SHUFFLENETV2_HOME" in message
    assert "checkpoint_path=" in message
    assert _listing(home) == []


def test_connection_refused(home: Path) -> None:
    # bound but never listening: connecting is refused, and no other test can grab the port meanwhile
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/w/model-{PREFIX}.ckpt"
        with pytest.raises(DownloadError) as info:
            hub.download(url, timeout=2)
    assert url in str(info.value)
    assert str(home / f"model-{PREFIX}.ckpt") in str(info.value)
    assert _listing(home) == []


def test_timeout(server: _Server, home: Path) -> None:
    url = server.serve(f"/w/model-{PREFIX}.ckpt", PAYLOAD, mode="hang")
    with pytest.raises(DownloadError) as info:
        hub.download(url, timeout=0.2)
    assert url in str(info.value)
    assert "0.2 s" in str(info.value)
    assert _listing(home) == []


def test_progress_only_when_asked_or_on_a_tty(
    server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.serve("/plain.bin", PAYLOAD)
    hub.download(url, tmp_path / "a.bin", expected_sha256_prefix=PREFIX)
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal
    hub.download(url, tmp_path / "b.bin", expected_sha256_prefix=PREFIX, progress=True)
    err = capsys.readouterr().err
    assert "b.bin" in err
    assert "100%" in err
    assert err.endswith("\n")


def test_fetch_pretrained_from_mirror(server: _Server, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shufflenet_v2_x1_0-{PREFIX}.ckpt"
    monkeypatch.setitem(hub.PRETRAINED_URLS, "shufflenet_v2_x1_0", f"{hub._RELEASE_DIR}/{name}")
    server.serve(f"/mirror/{name}", PAYLOAD)
    monkeypatch.setenv("SHUFFLENETV2_PRETRAINED_BASE_URL", server.base + "/mirror/")
    path = hub.fetch_pretrained("shufflenet_v2_x1_0")
    assert path == home / name
    assert path.read_bytes() == PAYLOAD
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hub.fetch_pretrained("shufflenet_v2_x1_0") == path
    assert server.hits[f"/mirror/{name}"] == 1
    assert _listing(home) == [name]


def test_fetch_pretrained_refuses_mismatching_real_name(
    server: _Server, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = Path(hub.PRETRAINED_URLS["shufflenet_v2_x0_5"]).name
    assert name == "shufflenet_v2_x0_5-8c841061.ckpt"
    server.serve(f"/mirror/{name}", PAYLOAD)
    monkeypatch.setenv("SHUFFLENETV2_PRETRAINED_BASE_URL", server.base + "/mirror")
    with pytest.raises(DownloadError, match="8c841061") as info:
        hub.fetch_pretrained("shufflenet_v2_x0_5")
    assert hashlib.sha256(PAYLOAD).hexdigest() in str(info.value)
    assert server.hits[f"/mirror/{name}"] == 1
    assert _listing(home) == []


def test_fetch_pretrained_offline_message(server: _Server, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUFFLENETV2_PRETRAINED_BASE_URL", server.base + "/nowhere")
    with pytest.raises(DownloadError) as info:
        hub.fetch_pretrained("shufflenet_v2_x2_0")
    message = str(info.value)
    assert server.base + "/nowhere/shufflenet_v2_x2_0-ed8e698d.ckpt" in message
    assert str(home / "shufflenet_v2_x2_0-ed8e698d.ckpt") in message
    assert "checkpoint_path=FILE in create_model, --ckpt_path FILE in train.py and validate.py" in message


def test_unknown_model_lists_valid_names(home: Path) -> None:
    with pytest.raises(DownloadError) as info:
        hub.fetch_pretrained("shufflenet_v3")
    message = str(info.value)
    assert "shufflenet_v3" in message
    for name in hub.PRETRAINED_URLS:
        assert name in message


def test_create_model_pretrained_end_to_end(
    server: _Server, home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pretrained=True: fetched over HTTP, hash-checked, cached, loaded; another class count drops the head."""
    import torch

    from shufflenetv2 import create_model, save_weights

    release = create_model("shufflenet_v2_x0_5")  # 1000 classes, like MindCV's release files
    staged = save_weights(tmp_path / "staged.ckpt", release)
    body = staged.read_bytes()
    name = f"shufflenet_v2_x0_5-{hashlib.sha256(body).hexdigest()[:8]}.ckpt"
    server.serve(f"/mirror/{name}", body)
    monkeypatch.setitem(hub.PRETRAINED_URLS, "shufflenet_v2_x0_5", f"https://example.invalid/dir/{name}")
    monkeypatch.setenv("SHUFFLENETV2_PRETRAINED_BASE_URL", server.base + "/mirror")

    model = create_model("shufflenet_v2_x0_5", pretrained=True)
    assert torch.equal(model.conv_last[0].weight, release.conv_last[0].weight)
    assert (home / name).read_bytes() == body
    tuned = create_model("shufflenet_v2_x0_5", num_classes=10, pretrained=True)  # MindCV drops the classifier
    assert tuned.classifier.weight.shape == (10, 1024)
    assert torch.equal(tuned.features[7].branch_main[0].weight, release.features[7].branch_main[0].weight)
    assert server.hits[f"/mirror/{name}"] == 1  # the second call used the cache
    through_hub = torch.hub.load(str(REPO), "shufflenet_v2_x0_5", source="local", pretrained=True)  # hubconf.py
    assert torch.equal(through_hub.conv_last[0].weight, release.conv_last[0].weight)


def test_torch_hub_lists_and_builds_the_four_widths() -> None:
    """hubconf.py, as ``torch.hub`` reads it from a clone: the widths, their help, create_model's arguments."""
    import torch

    from shufflenetv2 import MODEL_NAMES, create_model

    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    offered = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(offered) == sorted(MODEL_NAMES)  # torch.hub.list's rule: the public callables
    assert "pretrained=True loads MindCV's ImageNet weights" in hubconf.shufflenet_v2_x1_5.__doc__  # torch.hub.help
    torch.manual_seed(3)
    model = torch.hub.load(str(REPO), "shufflenet_v2_x1_0", source="local", num_classes=10, layout="torchvision")
    torch.manual_seed(3)
    reference = create_model("shufflenet_v2_x1_0", num_classes=10, layout="torchvision")
    assert type(model) is type(reference) and model.fc.out_features == 10
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
