"""The web app over a run folder (`python main.py app RUN`): its model side on every kind of upload, its review
tab against the interpretation it reuses, the CLI without gradio, and the page itself in headless Chromium."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install 'tinyfast[app]'")

from tinyfast.app import RunApp, serve  # noqa: E402
from tinyfast.errors import RunError  # noqa: E402
from tinyfast.interpret import most_confused, predict_valid  # noqa: E402
from tinyfast.predict import predict_images  # noqa: E402
from tinyfast.train import fit, load_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("app") / "run"
    fit(tiny_root, epochs=3, size=32, bs=16, lr=0.05, out=out, quiet=True)
    return out


@pytest.fixture(scope="module")
def model(run_dir) -> RunApp:
    return RunApp(load_run(run_dir))


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """What people upload: photos of any size and mode, and files that are not images at all."""
    d = tmp_path_factory.mktemp("uploads")
    yy, xx = np.indices((3000, 4000), dtype=np.uint16)
    photo = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    files = {"huge": d / "photo_4000px.jpg", "cmyk": d / "cmyk.jpg", "sixteen": d / "deep.png",
             "text": d / "notes.jpg", "empty": d / "empty.png"}
    Image.fromarray(photo).save(files["huge"], quality=80)
    Image.fromarray(photo[:300, :400]).convert("CMYK").save(files["cmyk"])
    Image.fromarray((photo[:300, :400, 0].astype(np.uint16) * 257)).save(files["sixteen"])  # mode I;16
    files["text"].write_text("not a picture, whatever its name says\n")
    files["empty"].write_bytes(b"")
    return files


def test_an_image_of_any_size_or_mode_gets_predicts_top5_and_a_cam(model, run_dir, uploads):
    learn = load_run(run_dir)
    for kind in ("huge", "cmyk", "sixteen"):
        top5, overlay, message = model.classify(str(uploads[kind]))
        expected = predict_images(learn, [uploads[kind]], topk=5)[0]["top"]
        assert list(top5) == [f"{name} ({wnid})" for wnid, name, _ in expected], kind
        assert list(top5.values()) == pytest.approx([p for _, _, p in expected])
        assert expected[0][1] in message
        h, w = Image.open(uploads[kind]).size[::-1]
        assert overlay.dtype == np.uint8 and overlay.shape[2] == 3
        assert overlay.shape[1] / overlay.shape[0] == pytest.approx(w / h, rel=0.01)  # the image's own shape
        assert max(overlay.shape[:2]) <= 1024


def test_a_bad_upload_is_a_message_not_an_error(model, uploads):
    for kind, says in (("text", "not an image this app can read"), ("empty", "is empty")):
        top5, overlay, message = model.classify({"path": str(uploads[kind])})  # gradio's unprocessed upload
        assert top5 == {} and overlay is None
        assert uploads[kind].name in message and says in message, message
        assert str(uploads[kind].parent) not in message  # no temp folder in the page
    assert model.classify(None) == ({}, None, "")  # the image cleared


def test_the_review_tab_shows_what_interpret_finds(model, run_dir):
    p = predict_valid(load_run(run_dir))
    shown = model.top_losses(5)
    worst = p.losses.topk(5).indices.tolist()
    assert [path for path, _ in shown] == [str(p.items[i]) for i in worst]
    for (_, caption), i in zip(shown, worst):
        assert caption.startswith(f"{p.names[int(p.targets[i])]} → {p.names[int(p.preds[i])]} (")
    table = most_confused(p)
    pairs = model.pairs()
    assert len(pairs) == min(len(table), 20)
    for (label, pair), row in zip(pairs, table.itertuples()):
        images = model.pair_images(pair)
        assert len(images) == row.count and label.endswith(f"{row.predicted_name} ({row.predicted_wnid}): {row.count}")
        for path, _ in images:
            i = [str(x) for x in p.items].index(path)
            assert p.vocab[int(p.targets[i])] == row.actual_wnid and p.vocab[int(p.preds[i])] == row.predicted_wnid
    assert model.pair_images(None) == []


def test_the_examples_are_val_images_one_per_class(model, run_dir):
    learn = model.learn
    examples = model.examples()
    labels = [learn.dls.valid_ds.items.index(Path(e)) for e in examples]
    classes = [int(learn.dls.valid_ds.tls[1][i]) for i in labels]
    assert sorted(classes) == list(range(learn.dls.c))  # 4 classes: every one, once


def test_without_gradio_the_cli_says_which_extra_in_one_line(run_dir):
    code = ("import sys; sys.modules['gradio'] = None; sys.argv = ['main.py', 'app', sys.argv[1]]; "
            "from tinyfast.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: the app needs gradio, which is not installed: "
                                   "pip install 'tinyfast[app]' (or pip install gradio)")


def test_a_port_in_use_is_one_line_before_the_run_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RunError) as e:
            serve(tmp_path / "not-even-a-run", port=port)  # refused before the run is read
    assert str(e.value) == f"cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port or --host"


# ---------------------------------------------------------------------------------------------------------
# The page, in a real browser
# ---------------------------------------------------------------------------------------------------------
def _browser():
    """Headless Chromium through selenium, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed"
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return None, "no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(options=options, service=Service(driver)), None
    except Exception as e:  # a browser that will not start (a missing library, a version mismatch)
        return None, f"chromium did not start: {str(e).splitlines()[0]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the app exited with {server.returncode}: {server.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the app did not answer at {url} within {seconds} s")


def test_the_page_in_chromium_predicts_as_predict_does(run_dir, tiny_root, uploads, model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser, why = _browser()
    if browser is None:
        pytest.skip(why)
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "main.py"), "app", str(run_dir), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        _wait_for(f"http://127.0.0.1:{port}/", server)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
        image = next((tiny_root / "val" / "images").glob("*.JPEG"))
        upload.send_keys(str(image))
        shown = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#top5 [data-testid=label-output-value]").text)
        learn = load_run(run_dir)
        wnid, name, _ = predict_images(learn, [image])[0]["top"][0]
        assert shown == f"{name} ({wnid})"
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#cam img"))
        browser.save_screenshot(str(tmp_path / "app.png"))
        assert (tmp_path / "app.png").stat().st_size > 10_000

        for kind, says in (("text", "not an image this app can read"), ("empty", "is empty"), ("huge", None),
                           ("cmyk", None), ("sixteen", None)):
            browser.get(f"http://127.0.0.1:{port}/")  # another visitor, with another file
            wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]")).send_keys(str(uploads[kind]))
            message = wait.until(lambda b: b.find_element(By.ID, "message").text)
            if says is None:  # an image: classified as predict classifies it
                assert predict_images(learn, [uploads[kind]])[0]["top"][0][1] in message, kind
            else:
                assert says in message and uploads[kind].name in message, message

        browser.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Review']").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#top-losses img")) > 0)
        assert model.pairs(), "the tiny run confuses nothing: the most confused pair cannot be shown"
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#pair-images img")) > 0)  # the first pair's
        assert server.poll() is None  # a bad upload and a tab later, the server is up
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)
