"""The HTTP service (`python -m sparse_embed.app serve`): endpoints, auth, limits, concurrency, metrics,
and the web page in a real headless browser.

Most tests run the application in this process with FastAPI's TestClient over one gallery of the
smoke run built once for the module from aligned crops (`--aligned`: no detection), each test on its
own copy. As in test_app_cli, the smoke run does not tell identities apart: a face is named because
its own embedding is in the gallery (score 1), which proves the service, not the model. The browser
test serves the real uvicorn server on a free loopback port and detects the astronaut photograph's
face with MTCNN.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_main_user_error, missing_dependency
from fastapi.testclient import TestClient
from PIL import Image

from sparse_embed.app import gallery as gallery_module
from sparse_embed.app.__main__ import main
from sparse_embed.app.embedder import Embedder, find_faces, load_detector, load_embedder
from sparse_embed.app.gallery import Gallery, ModelRecord
from sparse_embed.app.identify import identify_faces
from sparse_embed.app.live import (
    TOKEN_ENV,
    LiveGallery,
    RequestStats,
    SerialEmbedder,
    decode_upload,
    listen,
    read_token,
)
from sparse_embed.app.serve import ServiceConfig, create_app, make_server
from sparse_embed.edge.preprocess import decode
from sparse_embed.errors import ConfigError, DataError

pytestmark = pytest.mark.integration

ENROLLED = ("id_00000", "id_00001", "id_00002", "id_00003")
IMAGES = 2  # enrolled per person
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FACE_KEYS = {"box", "name", "score", "far", "landmarks", "confidence"}


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _form(data: bytes, name: str = "face.jpg") -> dict:
    return {"image": (name, data, "image/jpeg")}


def _record(embedder: Embedder, index_type: str) -> ModelRecord:
    return ModelRecord(embedder.fingerprint, embedder.model, None, embedder.width, embedder.height,
                       embedder.embedding_size, embedder.flip, index_type)


def _crop(embedder: Embedder, path: Path) -> np.ndarray:
    """An aligned crop file as the model's input (as `--aligned` reads it)."""
    (face,) = find_faces(decode(path), None, embedder.width, embedder.height)
    return face.crop


@pytest.fixture(scope="module")
def embedder(smoke_run: Path) -> Embedder:
    return load_embedder(smoke_run)


@pytest.fixture(scope="module")
def base_gallery(embedder: Embedder, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ENROLLED people, IMAGES aligned crops each, in a sparse gallery of the smoke run."""
    directory = tmp_path_factory.mktemp("service_gallery") / "g"
    gallery = Gallery.create(directory, _record(embedder, "sparse"))
    for person in ENROLLED:
        paths = [tiny_data / "train" / person / f"{k}.jpg" for k in range(IMAGES)]
        gallery.enroll(person, embedder.embed([_crop(embedder, p) for p in paths]), [str(p) for p in paths])
    gallery.save()
    return directory


@pytest.fixture
def make_client(embedder: Embedder, base_gallery: Path,
                tmp_path: Path) -> Callable[..., tuple[TestClient, Path, LiveGallery]]:
    """(TestClient, gallery directory, LiveGallery) of a service over a fresh copy of the gallery."""

    def make(**config: object) -> tuple[TestClient, Path, LiveGallery]:
        directory = tmp_path / f"g{len(list(tmp_path.iterdir()))}"
        shutil.copytree(base_gallery, directory)
        live = LiveGallery(directory, embedder.fingerprint, embedder.model)
        config.setdefault("token", TOKEN)
        app = create_app(live, embedder, None, ServiceConfig(**config))
        return TestClient(app), directory, live

    return make


def _error(response: object, status: int, *fragments: str) -> str:
    """The JSON error of a response with `status`: exactly {"error": one line}, naming the fragments."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def _state(directory: Path) -> tuple[str, list[str]]:
    """The current state's name and every state directory present."""
    return (json.loads((directory / "gallery.json").read_text())["state"],
            sorted(p.name for p in directory.glob("state-*")))


def test_endpoints_round_trip(make_client: Callable, embedder: Embedder, tiny_data: Path) -> None:
    client, directory, _ = make_client()
    assert client.get("/health").json() == {"status": "ok", "state": _state(directory)[0], "people": 4}
    page = client.get("/")
    assert page.status_code == 200 and 'id="identify-file"' in page.text and 'id="enrol-name"' in page.text
    assert client.get("/people").json() == {
        "people": [{"name": p, "embeddings": IMAGES} for p in ENROLLED], "count": 4}

    # Identify: the report's face entries, the same as the command line's for the same file.
    query = tiny_data / "train" / ENROLLED[1] / "1.jpg"
    answer = client.post("/identify", files=_form(_png(query)))
    assert answer.status_code == 200 and set(answer.json()) == {"faces"}
    (face,) = answer.json()["faces"]
    assert set(face) == FACE_KEYS and face["name"] == ENROLLED[1]
    metric, _, duration = answer.headers["server-timing"].partition(";dur=")
    assert metric == "app" and float(duration) > 0
    assert face["score"] == pytest.approx(1.0, abs=1e-4) and face["far"] is None
    assert answer.json()["faces"] == identify_faces(decode(query), Gallery.load(directory), embedder, None)

    # Enrol a new person (201), again (more embeddings), find them, remove them.
    newcomer = tiny_data / "test" / sorted(p.name for p in (tiny_data / "test").iterdir())[0] / "0.jpg"
    created = client.post("/people/zoe/faces", files=_form(_png(newcomer), "zoe.jpg"), headers=AUTH)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "zoe" and body["new_person"] is True and body["embeddings"] == 1
    assert set(body["face"]) == {"box", "landmarks", "confidence"}
    again = client.post("/people/zoe/faces", files=_form(_png(newcomer)), headers=AUTH).json()
    assert again["new_person"] is False and again["embeddings"] == 2
    assert Gallery.load(directory).people["zoe"]["images"] == ["upload:zoe.jpg", "upload:face.jpg"]
    assert client.post("/identify", files=_form(_png(newcomer))).json()["faces"][0]["name"] == "zoe"
    assert {"name": "zoe", "embeddings": 2} in client.get("/people").json()["people"]
    assert client.delete("/people/zoe", headers=AUTH).json() == {"name": "zoe", "removed": 2}
    assert "zoe" not in Gallery.load(directory).people
    _error(client.delete("/people/zoe", headers=AUTH), 404, "no person 'zoe'")
    current, states = _state(directory)
    assert states == [current]

    stats = client.get("/stats").json()
    assert stats["gallery"]["people"] == 4 and stats["gallery"]["embeddings"] == 4 * IMAGES
    assert stats["gallery"]["state"] == current and stats["gallery"]["calibration"] is None
    assert stats["model"]["fingerprint"] == embedder.fingerprint
    assert stats["index"]["type"] == "sparse" and stats["index"]["rows"] == 4 * IMAGES
    assert stats["index"]["nnz"] > 0 and stats["index"]["dim"] == embedder.embedding_size
    assert stats["requests"]["POST /identify"] == {"200": 2}
    assert stats["requests"]["POST /people/{name}/faces"] == {"201": 2}
    assert stats["requests"]["DELETE /people/{name}"] == {"200": 1, "404": 1}
    latency = stats["latency_ms"]["POST /identify"]
    assert latency["count"] == 2 and 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert stats["faces"] == {"named": 2, "unknown": 0, "enrolled": 2}


def test_writes_need_the_token(make_client: Callable, tiny_data: Path) -> None:
    client, directory, _ = make_client()
    before = _state(directory)
    image = _png(tiny_data / "train" / ENROLLED[0] / "0.jpg")
    for headers, fragment in (({}, "missing bearer token"), ({"Authorization": f"Basic {TOKEN}"}, "missing"),
                              ({"Authorization": "Bearer nope"}, "wrong token"),
                              ({"Authorization": f"Bearer {TOKEN}x"}, "wrong token")):
        response = client.post("/people/eve/faces", files=_form(image), headers=headers)
        _error(response, 401, fragment)
        assert response.headers["www-authenticate"] == "Bearer"
        _error(client.delete(f"/people/{ENROLLED[0]}", headers=headers), 401, fragment)
    assert _state(directory) == before
    assert client.post("/identify", files=_form(image)).status_code == 200  # open by default

    protected, _, _ = make_client(protect_identify=True)
    _error(protected.post("/identify", files=_form(image)), 401, "missing bearer token")
    assert protected.post("/identify", files=_form(image), headers=AUTH).status_code == 200
    read_only, _, _ = make_client(token=None)
    _error(read_only.post("/people/eve/faces", files=_form(image), headers=AUTH), 403, "read-only")


def _bomb(width: int, height: int) -> bytes:
    """A valid PNG header of width x height RGB pixels with almost no data (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_bad_uploads_are_refused_and_leave_nothing(make_client: Callable, tiny_data: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client, directory, _ = make_client(max_upload_mb=0.05)  # 51,200 bytes
    before = _state(directory)
    image = _png(tiny_data / "train" / ENROLLED[0] / "0.jpg")
    assert len(image) < 0.05 * 2**20
    # Oversize: a file over the limit, and a request body over it (stopped while it arrives).
    _error(client.post("/identify", files=_form(image + b"\0" * 60_000)), 413, "0.05 MiB")
    _error(client.post("/people/eve/faces", files=_form(b"\0" * 400_000), headers=AUTH), 413, "limit")
    # Not an image, an empty file, a truncated image, no multipart form, no `image` field.
    _error(client.post("/identify", files=_form(b"name,score\nann,1\n", "x.csv")), 415, "not an image")
    _error(client.post("/identify", files=_form(b"")), 415, "empty")
    _error(client.post("/identify", files=_form(image[: len(image) // 3])), 415)
    _error(client.post("/identify", json={"image": "x"}), 415, "multipart/form-data")
    _error(client.post("/identify", files={"photo": ("a.jpg", image, "image/jpeg")}), 422, "'image'")
    # Decompression bombs: refused from the header, never decoded (OpenCV is not called).
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a))
    _error(client.post("/identify", files=_form(_bomb(9000, 9000))), 413, "9000x9000")
    _error(client.post("/people/eve/faces", files=_form(_bomb(60000, 60000)), headers=AUTH), 413, "pixels")
    assert decoded == []
    monkeypatch.undo()
    # A failed enrol keeps nothing: a bad name, a non-image, and a save that fails halfway.
    _error(client.post("/people/unknown/faces", files=_form(image), headers=AUTH), 422, "another name")
    _error(client.post("/people/eve/faces", files=_form(b"GIF89a garbage"), headers=AUTH), 415)

    def broken(path: Path, array: np.ndarray) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gallery_module, "_save_npy", broken)
    _error(client.post("/people/eve/faces", files=_form(image), headers=AUTH), 500, "disk full", "unchanged")
    monkeypatch.undo()
    assert _state(directory) == before
    assert "eve" not in client.get("/people").text and "eve" not in Gallery.load(directory).people
    # Routes and methods that do not exist: JSON errors too.
    _error(client.get("/nowhere"), 404, "/nowhere")
    _error(client.put("/identify"), 405, "PUT")


def test_concurrent_identify_during_an_enrol_sees_the_old_or_the_new_gallery(
        make_client: Callable, embedder: Embedder, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, directory, live = make_client()
    stranger = sorted(p.name for p in (tiny_data / "test").iterdir())[1]
    query = _png(tiny_data / "test" / stranger / "0.jpg")
    old_name = client.post("/identify", files=_form(query)).json()["faces"][0]["name"]
    assert old_name != "ann"
    old = live.current()

    # The enrol stops while it writes the new state, until the readers have run against it.
    writing, release = threading.Event(), threading.Event()
    write_state = Gallery._write_state

    def slow_write(self: Gallery, state: Path) -> None:
        writing.set()
        assert release.wait(60)
        write_state(self, state)

    monkeypatch.setattr(Gallery, "_write_state", slow_write)
    results: list[tuple[int, str | None, bool]] = []
    enrolled: list[int] = []
    done = threading.Event()

    def read() -> None:
        while True:
            finished = done.is_set()
            response = client.post("/identify", files=_form(query))
            name = response.json()["faces"][0]["name"] if response.status_code == 200 else None
            results.append((response.status_code, name, finished))
            if finished:
                return

    def write() -> None:
        enrolled.append(client.post("/people/ann/faces", files=_form(query), headers=AUTH).status_code)
        done.set()

    with client:
        writer = threading.Thread(target=write)
        writer.start()
        assert writing.wait(60)
        readers = [threading.Thread(target=read) for _ in range(4)]
        for reader in readers:
            reader.start()
        while len(results) < 8:  # readers answered while the new state was being written
            threading.Event().wait(0.05)
        release.set()
        writer.join(60)
        for reader in readers:
            reader.join(60)
    assert enrolled == [201]
    assert all(status == 200 for status, _, _ in results), results
    assert {name for _, name, _ in results} <= {old_name, "ann"}
    assert [name for _, name, finished in results if finished] == ["ann"] * 4
    assert all(name == old_name for _, name, _ in results[:8])
    # The old snapshot stays readable after its state directory is gone.
    current, states = _state(directory)
    assert states == [current] and old.state != current and not (directory / old.state).exists()
    embedding = embedder.embed([_crop(embedder, tiny_data / "test" / stranger / "0.jpg")])
    names, scores = old.gallery.person_scores(embedding)
    assert "ann" not in names and scores.shape == (1, 4)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                     r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def _parse_metrics(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(family -> type, samples) of a Prometheus text exposition, checking its grammar."""
    types: dict[str, str] = {}
    samples = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4
        elif line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram"} and family not in types
            types[family] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, line
            name, labels, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, f"{name} has no TYPE line before it"
            pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
            samples.append((name, pairs, float(value)))
    return types, samples


def test_metrics_are_prometheus_text(make_client: Callable, tiny_data: Path) -> None:
    client, _, _ = make_client()
    image = _png(tiny_data / "train" / ENROLLED[2] / "0.jpg")
    for _ in range(3):
        assert client.post("/identify", files=_form(image)).status_code == 200
    client.post("/identify", files=_form(b"not an image"))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = _parse_metrics(response.text)
    assert types["sparse_embed_app_requests_total"] == "counter"
    assert types["sparse_embed_app_request_duration_seconds"] == "histogram"

    def value(name: str, **labels: str) -> float:
        (found,) = [v for n, ls, v in samples if n == name and ls.items() >= labels.items()]
        return found

    assert value("sparse_embed_app_requests_total", endpoint="/identify", status="200") == 3
    assert value("sparse_embed_app_requests_total", endpoint="/identify", status="415") == 1
    buckets = [(ls["le"], v) for n, ls, v in samples
               if n == "sparse_embed_app_request_duration_seconds_bucket" and ls["endpoint"] == "/identify"]
    counts = [v for _, v in buckets]
    assert buckets[-1][0] == "+Inf" and counts == sorted(counts)
    assert counts[-1] == value("sparse_embed_app_request_duration_seconds_count", endpoint="/identify") == 4
    assert value("sparse_embed_app_faces_total", result="named") == 3
    assert value("sparse_embed_app_gallery_people") == 4
    assert value("sparse_embed_app_gallery_embeddings") == 4 * IMAGES


@pytest.mark.unit
def test_uploads_tokens_and_label_escaping_without_a_model(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 10, 3), (255, 0, 0), np.uint8)).save(buffer, format="PNG")
    image = decode_upload(buffer.getvalue(), max_pixels=60)
    assert image.shape == (6, 10, 3) and tuple(image[0, 0]) == (255, 0, 0)  # RGB, as `decode` gives
    with pytest.raises(Exception, match="more than the limit of 59") as error:
        decode_upload(buffer.getvalue(), max_pixels=59)
    assert error.value.status == 413
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    assert read_token(None, {TOKEN_ENV: " abc "}) == "abc"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(tmp_path / "token", {TOKEN_ENV: "abc"}) == "from-file"
    (tmp_path / "two").write_text("a b\n")
    for path, error_type, fragment in ((tmp_path / "none", DataError, "cannot be read"),
                                       (tmp_path / "two", ConfigError, "whitespace")):
        with pytest.raises(error_type, match=fragment):
            read_token(path)
    with pytest.raises(ConfigError, match="is empty"):
        read_token(None, {TOKEN_ENV: " "})
    stats = RequestStats()
    stats.record("GET", '/a"b\\c', 200, 0.5)
    text = stats.prometheus([("gallery_people", "People.", 2)])
    assert 'endpoint="/a\\"b\\\\c"' in text and "sparse_embed_app_gallery_people 2\n" in text
    _parse_metrics(text)


@pytest.mark.unit
def test_serial_embedder_forwards_the_confidence_under_the_lock() -> None:
    """The service's embedder keeps what the wrapped model offers: its confidence too, in one
    thread at a time like `embed` (a LiteRT interpreter must not run in two threads)."""
    lock = threading.Lock()

    class Probabilistic:
        model, width, height, embedding_size, flip, sparse, fingerprint = "m", 4, 4, 2, "none", False, "f"
        has_confidence = True

        def embed(self, crops: list) -> np.ndarray:
            assert lock.locked()
            return np.ones((len(crops), 2), np.float32) / np.sqrt(2)

        def confidence(self, crops: list) -> np.ndarray:
            assert lock.locked()
            return np.arange(len(crops), dtype=np.float32) + 0.5

    crops = [np.zeros((4, 4, 3), np.uint8)] * 3
    serial = SerialEmbedder(Probabilistic(), lock)
    assert serial.has_confidence is True
    np.testing.assert_array_equal(serial.confidence(crops), [0.5, 1.5, 2.5])
    assert serial.embed(crops).shape == (3, 2) and not lock.locked()

    class Dirac(Probabilistic):
        has_confidence = False

    assert SerialEmbedder(Dirac(), lock).has_confidence is False


@pytest.mark.unit
def test_serve_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "empty").write_text("\n")
    assert_main_user_error(capsys, main, ["serve", f"--gallery={tmp_path / 'none'}"], "is not a gallery")
    for token_file, fragment in (("no", "cannot be read"), ("empty", "is empty")):
        argv = ["serve", f"--gallery={tmp_path}", f"--token_file={tmp_path / token_file}"]
        assert_main_user_error(capsys, main, argv, "--token_file", fragment)
    assert_main_user_error(capsys, main, ["serve", f"--gallery={tmp_path}", "--protect_identify"],
                           "--protect_identify needs a token")
    assert_main_user_error(capsys, main, ["serve", f"--gallery={tmp_path}", "--max_upload_mb=0"],
                           "--max_upload_mb")


def test_serve_refuses_an_address_in_use(base_gallery: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(DataError, match="cannot listen"):
            listen("127.0.0.1", port)
        assert_main_user_error(capsys, main, ["serve", f"--gallery={base_gallery}", f"--port={port}"],
                               f"cannot listen on 127.0.0.1:{port}")
    finally:
        taken.close()


@pytest.mark.slow
def test_the_web_page_in_a_real_browser(embedder: Embedder, tmp_path: Path) -> None:
    """Debian's Chromium (`make browser`) drives the page served by uvicorn: enrol the astronaut
    photograph under a name, upload it, and read the name in the page."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        missing_dependency("Debian's chromium and chromium-driver are not installed: run `make browser`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError as e:
        missing_dependency(f"selenium is not installed ({e}): run `make install`")
    from skimage import data as skimage_data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    directory = tmp_path / "g"
    Gallery.create(directory, _record(embedder, "sparse")).save()  # no one enrolled yet
    live = LiveGallery(directory, embedder.fingerprint, embedder.model)
    app = create_app(live, embedder, load_detector(None, False), ServiceConfig(token=TOKEN))
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server = make_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    browser = None
    try:
        WebDriverWait(None, 30, poll_frequency=0.1).until(lambda _: server.started)
        browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        browser.get(url)
        status = browser.find_element(By.ID, "status")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "enrol-name").send_keys("eileen")
        browser.find_element(By.ID, "enrol-file").send_keys(str(photo))
        browser.find_element(By.ID, "enrol-button").click()
        WebDriverWait(browser, 120).until(lambda b: "enrolled" in status.text or "error" in
                                          status.get_attribute("class"))
        assert status.text == "enrolled eileen (1 face(s))", status.text
        browser.find_element(By.ID, "identify-file").send_keys(str(photo))  # identifies on change
        WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#faces li")
                                          or "error" in status.get_attribute("class"))
        (face,) = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#faces li")]
        assert face.startswith("eileen 1.00"), face
        assert browser.find_element(By.ID, "canvas").is_displayed()
        assert "eileen (1)" in browser.find_element(By.ID, "people").text
    finally:
        if browser is not None:
            browser.quit()
        server.should_exit = True
        thread.join(30)
    assert Gallery.load(directory).counts() == {"eileen": 1}
