"""`effigen serve` (issue 22): the request checks in-process, then the Gradio API of a real server process on
loopback (list, generate, edit, compare; concurrent clients against the bounded queue; hostile inputs, each answered
with an error while the server stays up; no file outside the pipeline folders served), then the page itself in
headless Chromium (tests/test_serve.py::test_page_*: load, generate, paint a mask, edit, screenshots).

Two tiny random pipelines (8 px): a DiT with rectified flow (generates, cannot edit) and a VAR with its multi-scale
VQ tokenizer (generates and edits). The server is started once for the module with small limits."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effigen.cli.serve_service import (Limits, RequestError, ServeService, check_float, check_int,
                                       find_pipeline_folders, mask_from_image, pipeline_name, read_upload)
from effigen.config import UserError
from effigen.models.dit import DiT, DiTConfig
from effigen.models.var import VAR, VAR_PRESETS, VARConfig
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.objectives.next_scale import NextScaleConfig
from effigen.objectives.autoencoder import NoSamplerConfig
from effigen.objectives.vq_tokenizer import MSVQ_PRESETS, VQTokenizerLossConfig
from effigen.pipeline import Pipeline
from effigen.samplers.next_scale import NextScaleSamplerConfig
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig

from conftest import REPO, randomize

CLASSES = ["zero", "one", "two", "three"]
LIMITS = ["--max-images", "8", "--max-steps", "100", "--max-upload-mb", "1", "--max-upload-side", "256",
          "--concurrency", "1", "--max-queue", "4"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def tiny_dit() -> Pipeline:
    torch.manual_seed(0)
    network = randomize(DiT(DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                                      num_classes=4)))
    return Pipeline("dit-flow", network.eval(), RectifiedFlowConfig(), FlowSamplerConfig(solver="euler", num_steps=4,
                    cfg_scale=1.5), {"class_names": CLASSES})


def tiny_var() -> Pipeline:
    torch.manual_seed(0)
    tokenizer = MultiScaleVQ(MultiScaleVQConfig(**MSVQ_PRESETS["MSVQ-Test"], resolution=8)).eval()
    config = VARConfig(**VAR_PRESETS["VAR-Test"], num_classes=4, vocab_size=32, latent_channels=4, scales=(1, 2, 4))
    return Pipeline("var", randomize(VAR(config)).eval(), NextScaleConfig(),
                    NextScaleSamplerConfig(cfg_scale=1.5, top_k=0, top_p=0.0), {"class_names": CLASSES},
                    tokenizer=tokenizer)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs/-like folder: runs/tiny-dit/final and runs/tiny-var (a pipeline folder directly)."""
    root = tmp_path_factory.mktemp("serve") / "runs"
    tiny_dit().save_pretrained(root / "tiny-dit" / "final")
    tiny_var().save_pretrained(root / "tiny-var")
    (root / "notes").mkdir()  # a folder that is no pipeline is passed over
    tokenizer = tiny_var().tokenizer  # a tokenizer's own run cannot generate: skipped when found inside runs/
    Pipeline("msvq", None, VQTokenizerLossConfig(), NoSamplerConfig(), tokenizer=tokenizer).save_pretrained(
        root / "tiny-msvq" / "final")
    return root


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


# ------------------------------------------------------------------------------------- in-process checks
def test_fields_are_checked_with_messages_naming_them():
    assert check_int(3.0, "batch", 1, 8) == 3 and check_int("5", "seed", 0, 9) == 5
    assert check_float(0, "guidance", 0, 50) == 0.0
    for value, fragment in [(0, "between 1 and 8"), (9, "between 1 and 8"), (2.5, "whole number"),
                            (float("nan"), "finite"), (float("inf"), "finite"), ("abc", "expected a number"),
                            (True, "expected a number"), ([1], "expected a number")]:
        with pytest.raises(RequestError, match=f"batch: .*{fragment}"):
            check_int(value, "batch", 1, 8)
    with pytest.raises(RequestError, match="guidance: must be between 0 and 50, got -1"):
        check_float(-1, "guidance", 0, 50)


def test_folders_names_and_what_cannot_be_served(runs, tmp_path, capsys):
    folders = find_pipeline_folders([runs])
    assert folders == [(runs / "tiny-dit" / "final", False), (runs / "tiny-msvq" / "final", False),
                       (runs / "tiny-var", False)]
    assert [pipeline_name(f) for f, _ in folders] == ["tiny-dit", "tiny-msvq", "tiny-var"]
    service = ServeService.from_folders([runs, runs / "tiny-var"], limits=Limits(max_images=8))  # listed twice: once
    assert service.names == ["tiny-dit", "tiny-var"] and service.edit_names == ["tiny-var"]
    assert "skipping " in capsys.readouterr().out  # the tokenizer's run, found inside runs/
    with pytest.raises(UserError, match="holds a MultiScaleVQ tokenizer, not a generator"):
        ServeService.from_folders([runs / "tiny-msvq" / "final"])  # named: an error
    with pytest.raises(UserError, match="no subfolder with model_index.json"):
        find_pipeline_folders([tmp_path])
    with pytest.raises(UserError, match="no such folder"):
        find_pipeline_folders([tmp_path / "missing"])


def test_service_generate_edit_and_compare(runs):
    service = ServeService.from_folders([runs], limits=Limits(max_images=8, max_steps=100))
    images, info = service.generate("tiny-dit", None, 7, 2.0, 3, 6)
    assert images.shape == (6, 3, 8, 8) and info["labels"] == [0, 1, 2, 3, 0, 1]  # every class in turn
    assert info["settings"] == {"cfg_scale": 2.0, "num_steps": 3} and info["classes"][0] == "zero"
    again, _ = service.generate("tiny-dit", None, 7, 2.0, 3, 6)
    assert torch.equal(images, again)
    one_class, info = service.generate("tiny-dit", 2, 7, None, None, 3)
    assert one_class.shape == (3, 3, 8, 8) and info["labels"] == [2, 2, 2] and info["classes"] == ["two"] * 3
    assert service.generate("tiny-dit", "three", 7, None, None, 1)[1]["labels"] == [3]  # a class name works too
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1.0
    shown, edits, info = service.edit("tiny-var", image, mask, "inpaint", 1, 0, None, 3)
    assert shown.shape == (2, 3, 8, 8) and edits.shape == (3, 3, 8, 8) and info["class"] == "one"
    results = service.compare(["tiny-dit", "tiny-var"], None, 0, 2.0, 3, 2)
    assert [info["pipeline"] for _, info in results] == ["tiny-dit", "tiny-var"]
    assert results[0][1]["settings"] == {"cfg_scale": 2.0, "num_steps": 3}
    assert results[1][1]["settings"] == {"cfg_scale": 2.0}  # VAR has no step count: skipped in a comparison
    for bad, fragment in [(lambda: service.generate("tiny-var", None, 0, None, 5, 2), "has no step count"),
                          (lambda: service.generate("../tiny-dit", None, 0, None, None, 2), "unknown pipeline"),
                          (lambda: service.generate("tiny-dit", 4, 0, None, None, 2), "class: must be between 0 and 3"),
                          (lambda: service.edit("tiny-dit", image, mask), "cannot edit"),
                          (lambda: service.edit("tiny-var", image, mask[:16]), "mask: it is 32x16 px but the image"),
                          (lambda: service.edit("tiny-var", image, mask * 0), "nothing is painted"),
                          (lambda: service.edit("tiny-var", image, mask, "sideways"), "mode: must be"),
                          (lambda: service.compare([], None, 0, None, None, 2), "choose at least one"),
                          (lambda: service.compare(["tiny-dit", "tiny-dit"], None, 0, None, None, 2), "once")]:
        with pytest.raises(RequestError, match=fragment):
            bad()


def test_uploads_are_checked_for_size_and_type(tmp_path):
    limits = Limits(max_upload_bytes=2000, max_upload_side=64)
    (tmp_path / "ok.png").write_bytes(png_bytes(Image.new("RGB", (16, 16), (9, 9, 9))))
    assert read_upload(str(tmp_path / "ok.png"), "image", limits).size == (16, 16)
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "wide.png").write_bytes(png_bytes(Image.new("L", (65, 8))))
    (tmp_path / "big.png").write_bytes(png_bytes(Image.new("L", (8, 8))) + bytes(4000))
    Image.new("RGB", (8, 8)).save(tmp_path / "image.tiff")
    for name, fragment in [("text.png", "not a readable image"), ("wide.png", "65x8 px, the limit is 64"),
                           ("big.png", "MB, the limit is"), ("image.tiff", "TIFF file is not accepted"),
                           ("missing.png", "could not be read")]:
        with pytest.raises(RequestError, match=fragment):
            read_upload(str(tmp_path / name), "image", limits)
    painted = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    painted.putpixel((1, 2), (255, 0, 0, 255))
    assert mask_from_image(painted).sum() == 1.0 and mask_from_image(painted)[2, 1] == 1.0
    assert mask_from_image(Image.new("L", (4, 4), 255)).min() == 1.0  # opaque: white = regenerate


def test_without_gradio_the_command_says_how_to_install_it(runs, monkeypatch, capsys):
    import importlib.util

    from effigen.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve", "--pipelines", str(runs)]) == 2
    assert "pip install 'effigen[serve]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a real server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args) -> list[str]:
    return [sys.executable, "-m", "effigen", "serve", *map(str, args)]


def server_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("GRADIO_TEMP_DIR", None)
    return env


class Server:
    def __init__(self, runs: Path, log: Path):
        pytest.importorskip("gradio", reason="effigen serve needs the `serve` extra (bash scripts/setup.sh --test)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(serve_command("--pipelines", runs, "--port", self.port, *LIMITS),
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, env=server_env())
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with status {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.3)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, endpoint: str, *data, timeout: float = 60) -> tuple[str, object]:
        """One request to /gradio_api/call/ENDPOINT with raw JSON `data` (so NaN and types a client would refuse can
        be sent): ("complete", outputs) or ("error", message)."""
        import httpx

        body = json.dumps({"data": list(data)})  # json writes NaN / Infinity literals
        answer = httpx.post(f"{self.url}/gradio_api/call/{endpoint}", content=body,
                            headers={"content-type": "application/json"}, timeout=timeout)
        if answer.status_code != 200:
            return "error", f"HTTP {answer.status_code}: {answer.text}"
        event_id = answer.json()["event_id"]
        stream = httpx.get(f"{self.url}/gradio_api/call/{endpoint}/{event_id}", timeout=timeout).text
        event, payload = None, None
        for line in stream.splitlines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
        if event == "error":
            return "error", (payload or {}).get("error") if isinstance(payload, dict) else payload
        return event, payload

    def upload(self, name: str, content: bytes):
        import httpx

        answer = httpx.post(f"{self.url}/gradio_api/upload", files={"files": (name, content)}, timeout=30)
        if answer.status_code != 200:
            return None, answer.status_code
        return {"path": answer.json()[0], "meta": {"_type": "gradio.FileData"}}, 200

    def stop(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    server = Server(runs, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield server
    server.stop()
    assert server.process.returncode == 0, server.log.read_text()  # SIGTERM stops it like Ctrl-C


@pytest.fixture(scope="module")
def client(server):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(server.url + "/", verbose=False)


def test_api_list_generate_compare_and_edit(server, client, tmp_path):
    from gradio_client import handle_file

    listed = {p["name"]: p for p in json.loads(client.predict(api_name="/list"))}
    assert set(listed) == {"tiny-dit", "tiny-var"}
    assert listed["tiny-dit"]["method"] == "dit-flow" and not listed["tiny-dit"]["can_edit"]
    assert listed["tiny-var"]["can_edit"] and listed["tiny-var"]["class_names"] == CLASSES
    assert listed["tiny-dit"]["sampler"]["num_steps"] == 4 and listed["tiny-var"]["steps"] is None

    gallery, text, info = client.predict("tiny-dit", None, 3, 2.0, 2, 5, api_name="/generate")
    assert len(gallery) == 5 and [g["caption"] for g in gallery] == [f"class {c}" for c in CLASSES + CLASSES[:1]]
    first = [pixels(g["image"]) for g in gallery]
    assert first[0].shape == (128, 128, 3)  # 8 px shown 16x
    assert "5 images from tiny-dit in" in text and info["settings"] == {"cfg_scale": 2.0, "num_steps": 2}
    again, _, _ = client.predict("tiny-dit", None, 3, 2.0, 2, 5, api_name="/generate")
    assert all(np.array_equal(a, pixels(g["image"])) for a, g in zip(first, again))  # same seed, same images
    other, _, _ = client.predict("tiny-dit", None, 4, 2.0, 2, 5, api_name="/generate")
    assert not np.array_equal(first[0], pixels(other[0]["image"]))

    grids, table, infos = client.predict(["tiny-dit", "tiny-var"], 1, 0, None, None, 3, api_name="/compare")
    assert [i["pipeline"] for i in infos] == ["tiny-dit", "tiny-var"] and all(i["images_per_second"] > 0 for i in infos)
    assert "| tiny-var | var | 3 |" in table and "images/s" in grids[1]["caption"]

    image = (np.random.default_rng(1).random((24, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    mask = np.zeros((24, 24), np.uint8)
    mask[6:18, 6:18] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = (handle_file(tmp_path / "image.png"), handle_file(tmp_path / "mask.png"))
    edited, text, info = client.predict("tiny-var", *args, "inpaint", 2, 0, None, 3, api_name="/edit")
    assert [g["caption"] for g in edited] == ["input", "inpaint region (grey)", "edit 1", "edit 2", "edit 3"]
    assert info["class"] == "two" and "3 edits (inpaint) with tiny-var" in text
    outpainted, _, _ = client.predict("tiny-var", *args, "outpaint", None, 0, None, 1, api_name="/edit")
    assert not np.array_equal(pixels(edited[1]["image"]), pixels(outpainted[1]["image"]))  # the other region greyed
    assert server.alive


def test_concurrent_clients_are_queued_or_refused_never_dropped(server, client):
    """12 slow requests at once against --concurrency 1 --max-queue 4: each one either completes with its images
    or is refused because the queue is full; none hangs, and the server serves on."""
    jobs = [client.submit("tiny-dit", None, i, None, 100, 8, api_name="/generate") for i in range(12)]
    done, refused = 0, 0
    for job in jobs:
        try:
            gallery, _, info = job.result(timeout=120)
            assert len(gallery) == 8 and info["settings"] == {"num_steps": 100}
            done += 1
        except Exception as e:  # gradio_client's QueueError
            assert "queue is full" in str(e).lower(), e
            refused += 1
    assert done >= 1 and refused >= 1 and done + refused == 12
    assert server.call("generate", "tiny-dit", None, 0, None, None, 2)[0] == "complete"


def test_hostile_inputs_are_errors_and_the_server_serves_on(server, runs):
    ok = ("tiny-dit", None, 0, None, None, 2)  # pipeline, class, seed, guidance, steps, batch
    hostile = [
        (("tiny-dit", None, 0, None, None, 10**9), "batch: must be between 1 and 8"),
        (("tiny-dit", None, 0, None, None, -3), "batch: must be between 1 and 8"),
        (("tiny-dit", None, 0, None, None, 2.5), "batch: must be a whole number"),
        (("tiny-dit", None, -1, None, None, 2), "seed: must be between 0"),
        (("tiny-dit", None, 2**70, None, None, 2), "seed: must be between 0"),
        (("tiny-dit", None, 0, None, 10**6, 2), "steps: must be between 1 and 100"),
        (("tiny-dit", None, 0, None, -5, 2), "steps: must be between 1 and 100"),
        (("tiny-dit", None, 0, -1.0, None, 2), "guidance: must be between 0 and 50"),
        (("tiny-dit", None, 0, 1e308, None, 2), "guidance: must be between 0 and 50"),
        (("tiny-dit", None, 0, float("nan"), None, 2), "guidance: must be a finite number"),
        (("tiny-dit", None, 0, None, float("inf"), 2), "must be a finite number"),
        (("tiny-dit", 99, 0, None, None, 2), "class: must be between 0 and 3"),
        (("tiny-dit", -1, 0, None, None, 2), "class: must be between 0 and 3"),
        (("tiny-var", None, 0, None, 5, 2), "tiny-var (var) has no step count"),
        (("nope", None, 0, None, None, 2), "nope"),
        (("../../etc/passwd", None, 0, None, None, 2), "passwd"),
        ((str(runs / "tiny-dit" / "final"), None, 0, None, None, 2), "final"),
    ]
    for data, fragment in hostile:
        event, message = server.call("generate", *data)
        assert event == "error" and fragment in str(message), (data, event, message)
        assert server.call("generate", *ok)[0] == "complete", data

    image = Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype(np.uint8))
    good_image, _ = server.upload("image.png", png_bytes(image))
    good_mask, _ = server.upload("mask.png", png_bytes(Image.new("L", (16, 16), 255)))
    small_mask, _ = server.upload("small.png", png_bytes(Image.new("L", (8, 8), 255)))
    empty_mask, _ = server.upload("empty.png", png_bytes(Image.new("L", (16, 16), 0)))
    text_file, _ = server.upload("notes.png", b"#!/bin/sh\necho this is no image\n")
    huge_image, _ = server.upload("huge.png", png_bytes(Image.new("RGB", (300, 40))))
    edit_cases = [
        (("tiny-var", text_file, good_mask), "image: not a readable image"),
        (("tiny-var", good_image, text_file), "mask: not a readable image"),
        (("tiny-var", good_image, small_mask), "mask: it is 8x8 px but the image is 16x16 px"),
        (("tiny-var", good_image, empty_mask), "nothing is painted"),
        (("tiny-var", huge_image, good_mask), "300x40 px, the limit is 256 px"),
        (("tiny-dit", good_image, good_mask), "tiny-dit"),  # not among the edit choices
        (("tiny-var", None, good_mask), "image: no image given"),
        (("tiny-var", {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, good_mask), "not uploaded"),
        (("tiny-var", good_image, {"path": str(runs / "tiny-var" / "model_index.json"),
                                   "meta": {"_type": "gradio.FileData"}}), "not uploaded"),
    ]
    for (name, image_file, mask_file), fragment in edit_cases:
        event, message = server.call("edit", name, image_file, mask_file, "inpaint", None, 0, None, 2)
        assert event == "error" and fragment in str(message), (name, event, message)
    assert server.call("edit", "tiny-var", good_image, good_mask, "inpaint", None, 0, None, 2)[0] == "complete"

    # uploads over --max-upload-mb are refused by the server itself (not only by clients that check)
    _, status = server.upload("big.png", png_bytes(Image.new("L", (8, 8))) + bytes(2 * 2**20))
    assert status == 413
    # no file outside Gradio's own cache is served: neither a pipeline folder's nor any other
    import httpx

    for path in [runs / "tiny-var" / "model_index.json",
                 runs / "tiny-dit" / "final" / "generator" / "model.safetensors",
                 Path("/etc/passwd"), REPO / "README.md"]:
        answer = httpx.get(f"{server.url}/gradio_api/file={path}", timeout=10)
        assert answer.status_code in (403, 404), (path, answer.status_code)
    assert server.alive and server.call("generate", *ok)[0] == "complete"


def test_binding_beyond_loopback_warns_and_a_taken_port_is_a_clear_error(runs, tmp_path):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(serve_command("--pipelines", runs, "--host", "0.0.0.0", "--port", port),
                                capture_output=True, text=True, env=server_env(), timeout=120)
    assert "WARNING: effigen serve is bound to 0.0.0.0, not loopback" in result.stderr
    assert result.returncode == 2 and f"--port {port}: cannot serve there" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- the page in Chromium
def find_chromium() -> str | None:
    """EFFIGEN_CHROMIUM, else Debian's chromium (scripts/setup.sh --test installs it where it can), else one on PATH.
    Playwright's own browser download is not used."""
    import shutil

    for candidate in (os.environ.get("EFFIGEN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def skip_browser(reason: str):
    import warnings

    warnings.warn(f"effigen serve browser tests skipped: {reason}")  # shown in pytest's warnings summary
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_browser("Playwright is not installed (pip install playwright; bash scripts/setup.sh --test installs it)")
    executable = find_chromium()
    if executable is None:
        skip_browser("no Chromium found and none could be installed (scripts/setup.sh --test installs Debian's "
                     "`chromium` with apt-get when run as root; or set EFFIGEN_CHROMIUM=/path/to/chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the page's screenshots go: EFFIGEN_SERVE_SCREENSHOTS if set (kept), else a test folder."""
    folder = Path(os.environ.get("EFFIGEN_SERVE_SCREENSHOTS") or tmp_path_factory.mktemp("serve-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(target, path: Path) -> np.ndarray:
    target.screenshot(path=str(path))
    return pixels(path)


def not_blank(image: np.ndarray) -> bool:
    """More than a flat page: many distinct colours and a real spread of values."""
    colours = np.unique(image.reshape(-1, 3).astype(np.uint8), axis=0)
    return len(colours) > 64 and float(image.std()) > 10.0


def test_page_loads_generates_paints_a_mask_and_edits(server, browser, shots):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(server.url + "/", wait_until="load", timeout=60_000)
        page.wait_for_selector("#generate-button", timeout=60_000)
        assert "tiny-dit" in page.inner_text("body") and "tiny-var" in page.inner_text("body")

        page.fill("#generate-seed input", "5")
        page.click("#generate-button")
        page.wait_for_selector("#generate-gallery img", timeout=60_000)
        page.wait_for_function("document.querySelector('#generate-time textarea, #generate-time input').value"
                               ".includes('images from tiny-dit')", timeout=60_000)
        assert page.locator("#generate-gallery img").count() >= 8
        generated = screenshot(page, shots / "1-generate.png")
        assert not_blank(screenshot(page.locator("#generate-gallery"), shots / "1-generate-gallery.png"))

        page.locator("#generate-gallery img").nth(1).click()  # select the second image, take it to the editor
        page.click("#generate-send-to-edit")
        page.wait_for_selector("#edit-canvas canvas", timeout=30_000)
        page.wait_for_timeout(500)
        canvas = page.locator("#edit-canvas")
        before_paint = screenshot(canvas, shots / "2-edit-image.png")
        assert not_blank(before_paint)
        page.click("#edit-canvas button[aria-label='Brush']")
        box = page.locator("#edit-canvas canvas").last.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 50, y - 30)
        page.mouse.down()
        for i in range(20):
            page.mouse.move(x - 50 + 5 * i, y - 30 + 3 * i)
        page.mouse.up()
        page.wait_for_timeout(300)
        painted = screenshot(canvas, shots / "3-mask-painted.png")
        assert np.abs(painted - before_paint).mean() > 1.0  # the brush stroke is on the canvas

        empty_results = screenshot(page.locator("#edit-gallery"), shots / "4-before-edit.png")
        page.click("#edit-button")
        page.wait_for_selector("#edit-gallery img", timeout=60_000)
        page.wait_for_function("document.querySelector('#edit-time textarea, #edit-time input').value"
                               ".includes('edits (inpaint) with tiny-var')", timeout=60_000)
        assert page.locator("#edit-gallery img").count() == 6  # input, region, 4 edits
        page.wait_for_timeout(500)
        results = screenshot(page.locator("#edit-gallery"), shots / "5-edit-results.png")
        edited = screenshot(page, shots / "6-edit.png")
        assert not_blank(results) and not_blank(edited) and not_blank(generated)
        assert results.shape != empty_results.shape or np.abs(results - empty_results).mean() > 5.0

        page.get_by_role("tab", name="Generate").click()  # a bad field in the page: a message, not a traceback
        page.fill("#generate-seed input", "-4")
        page.click("#generate-button")
        page.wait_for_selector("text=seed: must be between 0", timeout=30_000)
        assert "Traceback" not in page.inner_text("body")
    finally:
        page.close()
    assert server.alive and server.call("generate", "tiny-dit", None, 0, None, None, 2)[0] == "complete"
