"""A web page over a trained run, `python main.py app RUN`: what fastai's course does after `learn.export()`.

Anyone with a browser can try the model on their own pictures: the top-5 classes with their names, and the
Grad-CAM of the top one. A second tab browses the run's top losses and its most confused pairs, with the images.
Everything shown comes from the functions the CLI uses (`predict_images`, `cam_overlays`, `predict_valid`,
`most_confused`), and the app writes nothing of its own: gradio keeps uploads in its temp folder.

Every upload gets its answer in the page: an image of any size or mode (a 4000 px photo, CMYK, 16-bit) is
classified, and a file that is not one (or is empty) gets a message. gradio's own image input would decode the
upload itself and fail with a bare "Error", so the upload event skips gradio's preprocessing (`preprocess=False`),
and `RunApp.classify` is handed the file as it is and says what is wrong with it.
"""
from __future__ import annotations

import socket
import threading
from functools import cached_property
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from fastai.learner import Learner

from .dataset import DatasetError
from .errors import RunError, one_line
from .interpret import ValPredictions, most_confused, predict_valid
from .predict import cam_overlays, predict_images

__all__ = ["RunApp", "build_app", "serve"]

EXAMPLES = 12     # val images offered to click on, one per class
TOP_LOSSES = 24   # images in the review tab's top losses
PAIRS = 20        # most confused pairs offered in the review tab


class RunApp:
    """The model side of the page, usable without a browser. One lock: gradio runs events in threads, and a
    Learner predicts one batch at a time."""

    def __init__(self, learn: Learner):
        self.learn = learn
        self._lock = threading.Lock()

    def classify(self, upload: str | Path | dict | None) -> tuple[dict[str, float], np.ndarray | None, str]:
        """({"name (wnid)": probability} for the top 5, the Grad-CAM overlay, a line of text) for one file (a
        path, or gradio's unprocessed upload: {"path": ...}); for a file that cannot be classified, ({}, None,
        what is wrong with it)."""
        if not upload:
            return {}, None, ""
        path = Path(upload["path"] if isinstance(upload, dict) else upload)
        try:
            if path.stat().st_size == 0:
                return {}, None, f"⚠️ {path.name} is empty."
            with self._lock, self.learn.no_bar():
                top = predict_images(self.learn, [path], topk=5)[0]["top"]
                overlay, _, _ = cam_overlays(self.learn, [path])[0]
        except DatasetError as e:
            return {}, None, f"⚠️ {path.name} is not an image this app can read: {_reason(e, path)}"
        except Exception as e:  # the page says it, and the server goes on
            return {}, None, f"⚠️ {path.name} could not be classified: {_reason(e, path)}"
        wnid, name, p = top[0]
        return {f"{n} ({w})": q for w, n, q in top}, overlay, f"**{name}** ({wnid}), probability {p:.2f}"

    def examples(self, n: int = EXAMPLES) -> list[str]:
        """The first val image of each of the first `n` classes."""
        ds = self.learn.dls.valid_ds
        first: dict[int, str] = {}
        for item, label in zip(ds.items, ds.tls[1]):
            first.setdefault(int(label), str(item))
            if len(first) == n:
                break
        return [first[k] for k in sorted(first)]

    @cached_property
    def val(self) -> ValPredictions:
        """Every val image predicted once, on the first visit to the review tab."""
        with self._lock, self.learn.no_bar():
            return predict_valid(self.learn)

    def top_losses(self, k: int = TOP_LOSSES) -> list[tuple[str, str]]:
        """(image, caption) of the `k` val images the model got most wrong."""
        p = self.val
        losses, idx = p.losses.topk(min(k, len(p)))
        return [(str(p.items[i]), _caption(p, i, loss)) for i, loss in zip(idx.tolist(), losses.tolist())]

    def pairs(self, n: int = PAIRS) -> list[tuple[str, str]]:
        """The `n` most confused pairs as a menu: ("actual (wnid) → predicted (wnid): count", "actual predicted")."""
        table = most_confused(self.val).head(n)
        return [(f"{r.actual_name} ({r.actual_wnid}) → {r.predicted_name} ({r.predicted_wnid}): {r.count}",
                 f"{r.actual_wnid} {r.predicted_wnid}") for r in table.itertuples()]

    def pair_images(self, pair: str | None) -> list[tuple[str, str]]:
        """(image, caption) of the val images of one pair ("actual_wnid predicted_wnid", a value of `pairs`), the
        most confident mistakes first."""
        if not pair:
            return []
        p = self.val
        actual, predicted = (p.vocab.index(wnid) for wnid in pair.split())
        idx = torch.nonzero((p.targets == actual) & (p.preds == predicted)).flatten()
        idx = idx[p.losses[idx].argsort(descending=True)]
        return [(str(p.items[i]), _caption(p, i, float(p.losses[i]))) for i in idx.tolist()]


def _caption(p: ValPredictions, i: int, loss: float) -> str:
    pred, targ = int(p.preds[i]), int(p.targets[i])
    return f"{p.names[targ]} → {p.names[pred]} ({float(p.probs[i, pred]):.2f}); loss {loss:.2f}"


def _reason(error: Exception, path: Path) -> str:
    """The error's one line, with gradio's temp path shortened to the file's name."""
    return one_line(error).replace(str(path), path.name)


def build_app(learn: Learner, title: str = "tinyfast") -> gr.Blocks:
    """The page: a "Classify" tab (upload or pick a val image: top-5 and Grad-CAM) and a "Review" tab (top
    losses, most confused pairs)."""
    model = RunApp(learn)
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nUpload an image, or pick a validation image below.")
        with gr.Tab("Classify"):
            with gr.Row():
                image = gr.Image(label="image", type="filepath", sources=["upload"], height=320, elem_id="upload")
                cam = gr.Image(label="Grad-CAM of the top class", interactive=False, height=320, elem_id="cam")
            message = gr.Markdown(elem_id="message")
            top5 = gr.Label(label="top 5", num_top_classes=5, elem_id="top5")
            gr.Examples(model.examples(), inputs=image, label="validation images")
            image.change(model.classify, inputs=image, outputs=[top5, cam, message], preprocess=False)
        with gr.Tab("Review") as review:
            losses = gr.Gallery(label="top losses (actual → predicted)", columns=6, height="auto", elem_id="top-losses")
            pair = gr.Dropdown(label="most confused pairs (actual → predicted: count)", choices=[], elem_id="pairs")
            pair_images = gr.Gallery(label="the images of that pair", columns=6, height="auto", elem_id="pair-images")
            review.select(lambda: (model.top_losses(), _pair_menu(model.pairs())), outputs=[losses, pair])
            pair.change(model.pair_images, inputs=pair, outputs=pair_images)
    return page


def _pair_menu(pairs: list[tuple[str, str]]) -> gr.Dropdown:
    """The pairs to pick from, the most confused one picked (none when the model confuses nothing)."""
    return gr.Dropdown(choices=pairs, value=pairs[0][1] if pairs else None)


def _check_address(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RunError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None


def serve(run_dir: Path | str, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          data: Path | str | None = None, precision: str | None = None) -> None:
    """Load the run and serve its page until interrupted (`share`: gradio's public link)."""
    from .train import load_run
    _check_address(host, port)  # before the minute of loading a full-data run
    learn = load_run(run_dir, data=data, precision=precision)
    build_app(learn, title=f"tinyfast: {Path(run_dir).name}").launch(  # the val images are shown from the dataset
        server_name=host, server_port=port, share=share, allowed_paths=[str(learn.dls.root)], show_error=True)
