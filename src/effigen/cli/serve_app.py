"""The Gradio page of `effigen serve` (the checks and the work are `effigen.cli.serve_service.ServeService`).

Every event that computes goes through Gradio's queue under one concurrency id ("compute") limited to
`Limits.concurrency`, and the queue holds at most `Limits.max_queue` requests. Every handler turns a bad field into a
Gradio error carrying the message (shown in the page; `gradio_client` raises it as AppError) and any other failure
into one that says generation failed; the server keeps serving. Gradio's file cache is a fresh temporary folder
(deleted at exit; files older than 30 minutes every 10 minutes); no other path is allowed to be served. Per-session
state (a session's last generated images) lives at most an hour, for at most 256 sessions.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback

if "GRADIO_TEMP_DIR" not in os.environ:  # read by Gradio at import: its upload/output cache, ours alone
    _cache = tempfile.mkdtemp(prefix="effigen-serve-")
    os.environ["GRADIO_TEMP_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..config import UserError  # noqa: E402
from ..images import to_pil  # noqa: E402
from .serve_service import (DISPLAY_SIDE, RequestError, ServeService, display_images, grid_image,  # noqa: E402
                    mask_from_image, read_upload)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COMPUTE = "compute"
STATE_SECONDS = 3600  # a session's last generated images are kept this long at most ...
STATE_SESSIONS = 256  # ... for this many sessions at most (the oldest are dropped): memory stays bounded


def THEME():
    """Gradio's default look with the system's fonts: the default theme fetches Google Fonts, which a closed network
    never answers (the page would wait on them)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def guarded(fn):
    """Bad fields -> the field's message; any other failure -> 'generation failed' with its cause. Both are Gradio
    errors: shown in the page, raised by gradio_client; never a traceback to the user."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except RequestError as e:
            raise gr.Error(str(e), title="Invalid request", print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("generation failed: out of memory; ask for fewer images", title="Failed") from None
        except Exception as e:
            traceback.print_exc()
            raise gr.Error(f"generation failed ({type(e).__name__}: {e}); the server keeps serving, try other "
                           "settings", title="Failed") from None

    return wrapper


def describe(service: ServeService, name: str | None) -> str:
    if name not in service.entries:
        return ""
    s = service.entries[name].summary()
    classes = ", ".join(f"{i} {n}" if str(i) != n else n for i, n in enumerate(s["class_names"][:12]))
    more = ", ..." if s["num_classes"] > 12 else ""
    guidance = "none" if s["guidance"] is None else f"{s['guidance']['setting']} {s['guidance']['saved']:g}"
    steps = "set by its scales" if s["steps"] is None else str(s["steps"])
    return (f"**{s['method']}**, {s['resolution']} px; classes: {classes}{more}; saved guidance: {guidance}; "
            f"saved steps: {steps}{'; can edit' if s['can_edit'] else ''}")


def build(service: ServeService) -> gr.Blocks:
    limits = service.limits
    names = service.names
    edit_names = service.edit_names
    compute = {"concurrency_id": COMPUTE, "concurrency_limit": limits.concurrency}
    ui = {"queue": False, "api_visibility": "private"}

    @guarded
    def generate(name, label, seed, guidance, steps, batch):
        images, info = service.generate(name, label, seed, guidance, steps, batch)
        shown = [(im, f"class {c}") for im, c in zip(display_images(images), info["classes"])]
        text = (f"{info['images']} images from {info['pipeline']} in {info['seconds']:.3f} s "
                f"({info['images_per_second']:.3g} images/s)")
        return shown, text, info, to_pil(images), None

    @guarded
    def edit_files(name, image_file, mask_file, mode, label, seed, guidance, num):
        image = read_upload(image_file, "image", limits)
        mask = mask_from_image(read_upload(mask_file, "mask", limits))
        return _edit(name, image, mask, mode, label, seed, guidance, num)

    @guarded
    def edit_canvas(name, canvas, mode, label, seed, guidance, num):
        if not canvas or canvas.get("background") is None:
            raise RequestError("image: no image; upload one or take a generated one (Generate tab, 'Edit the "
                               "selected image')")
        image = canvas["background"]
        if max(image.size) > limits.max_upload_side:
            raise RequestError(f"image: {image.width}x{image.height} px, the limit is {limits.max_upload_side} px "
                               "a side")
        layers = [layer for layer in canvas.get("layers") or [] if layer is not None]
        if not layers:
            raise RequestError("mask: nothing is painted; paint the region to regenerate (inpaint) or to keep "
                               "(outpaint) on the image with the brush")
        masks = []
        for layer in layers:
            if layer.size != image.size:
                raise RequestError(f"mask: the painted layer is {layer.width}x{layer.height} px but the image is "
                                   f"{image.width}x{image.height} px; paint on the image itself")
            masks.append(mask_from_image(layer))
        mask = functools.reduce(np.maximum, masks)
        return _edit(name, image, mask, mode, label, seed, guidance, num)

    def _edit(name, image, mask, mode, label, seed, guidance, num):
        shown, edits, info = service.edit(name, image, mask, mode, label, seed, guidance, num)
        gallery = [(im, caption) for im, caption in zip(display_images(shown), ("input", f"{mode} region (grey)"))]
        gallery += [(im, f"edit {i + 1}") for i, im in enumerate(display_images(edits))]
        text = (f"{info['edits']} edits ({mode}) with {info['pipeline']} in {info['seconds']:.3f} s "
                f"({info['images_per_second']:.3g} images/s)")
        return gallery, text, info

    @guarded
    def compare(chosen, label, seed, guidance, steps, batch):
        results = service.compare(chosen, label, seed, guidance, steps, batch)
        gallery, rows, infos = [], ["| pipeline | method | images | seconds | images/s |", "|---|---|---|---|---|"], []
        for images, info in results:
            gallery.append((grid_image(images), f"{info['pipeline']} ({info['method']}): "
                                                f"{info['images_per_second']:.3g} images/s"))
            rows.append(f"| {info['pipeline']} | {info['method']} | {info['images']} | {info['seconds']:.3f} | "
                        f"{info['images_per_second']:.3g} |")
            infos.append(info)
        return gallery, "\n".join(rows), infos

    def take_generated(images, selected):
        if not images:
            raise gr.Error("generate images first (Generate tab), then pick one", title="Nothing to edit")
        index = selected if isinstance(selected, int) and 0 <= selected < len(images) else 0
        image = display_images_pil(images[index])
        return {"background": image, "layers": [], "composite": image}, gr.Tabs(selected="edit")

    def select(evt: gr.SelectData):
        return evt.index

    with gr.Blocks(title="effigen", delete_cache=(600, 1800)) as demo:
        gr.Markdown(f"# effigen\n{len(names)} pipeline{'s' if len(names) != 1 else ''}: "
                    + ", ".join(f"`{n}` ({service.entries[n].pipeline.method.name})" for n in names)
                    + f". At most {limits.max_images} images and {limits.max_steps} steps per request.")
        generated = gr.State(None, time_to_live=STATE_SECONDS)  # the last images, native size, for the editor
        selected = gr.State(None, time_to_live=STATE_SECONDS)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        g_pipe = gr.Dropdown(names, value=names[0], label="pipeline", elem_id="generate-pipeline")
                        g_about = gr.Markdown(describe(service, names[0]))
                        g_class = gr.Textbox("", label="class (empty: every class in turn)", elem_id="generate-class")
                        g_seed = gr.Number(0, label="seed", elem_id="generate-seed")
                        g_guidance = gr.Textbox("", label="guidance (empty: the saved one)",
                                                elem_id="generate-guidance")
                        g_steps = gr.Textbox("", label="steps (empty: the saved ones)", elem_id="generate-steps")
                        g_batch = gr.Number(min(8, limits.max_images), label=f"batch (1..{limits.max_images})",
                                            elem_id="generate-batch")
                        g_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    with gr.Column(scale=2):
                        g_gallery = gr.Gallery(label="images", columns=6, format="png", elem_id="generate-gallery",
                                               object_fit="contain", height="auto")
                        g_time = gr.Textbox(label="time", interactive=False, elem_id="generate-time")
                        g_send = gr.Button("Edit the selected image", elem_id="generate-send-to-edit",
                                           interactive=bool(edit_names))
                        with gr.Accordion("details", open=False):
                            g_info = gr.JSON(label="request")
            with gr.Tab("Edit", id="edit"):
                if not edit_names:
                    gr.Markdown("No served pipeline supports editing (VAR and HMAR pipelines do).")
                with gr.Row():
                    with gr.Column(scale=1):
                        e_canvas = gr.ImageEditor(type="pil", image_mode="RGBA", format="png", label="image: paint "
                                                  "the region with the brush", sources=("upload", "clipboard"),
                                                  brush=gr.Brush(colors=["#ff3030"], color_mode="fixed"),
                                                  layers=False, transforms=(), canvas_size=(256, 256),
                                                  elem_id="edit-canvas")
                    with gr.Column(scale=1):
                        e_pipe = gr.Dropdown(edit_names, value=edit_names[0] if edit_names else None,
                                             label="pipeline (those that can edit)", elem_id="edit-pipeline")
                        e_mode = gr.Radio(["inpaint", "outpaint"], value="inpaint", label="regenerate",
                                          info="inpaint: the painted region; outpaint: everything outside it",
                                          elem_id="edit-mode")
                        e_class = gr.Textbox("", label="class (empty: unconditional)", elem_id="edit-class")
                        e_seed = gr.Number(0, label="seed", elem_id="edit-seed")
                        e_guidance = gr.Textbox("", label="guidance (empty: the saved one)", elem_id="edit-guidance")
                        e_num = gr.Number(min(4, limits.max_images), label=f"edits (1..{limits.max_images})",
                                          elem_id="edit-num")
                        e_button = gr.Button("Edit", variant="primary", elem_id="edit-button",
                                             interactive=bool(edit_names))
                e_gallery = gr.Gallery(label="input, region, edits", columns=6, format="png", elem_id="edit-gallery",
                                       object_fit="contain", height="auto")
                e_time = gr.Textbox(label="time", interactive=False, elem_id="edit-time")
                with gr.Accordion("details", open=False):
                    e_info = gr.JSON(label="request")
                with gr.Row(visible=False):  # the /edit API endpoint: an image file and a mask file
                    f_image = gr.File(label="image file", type="filepath")
                    f_mask = gr.File(label="mask file", type="filepath")
                    f_button = gr.Button("edit files")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1):
                        c_pipes = gr.CheckboxGroup(names, value=names[:4], label="pipelines",
                                                   elem_id="compare-pipelines")
                        c_class = gr.Textbox("", label="class (empty: every class in turn)")
                        c_seed = gr.Number(0, label="seed")
                        c_guidance = gr.Textbox("", label="guidance (empty: each one's saved)")
                        c_steps = gr.Textbox("", label="steps (empty: each one's saved; skipped where none)")
                        c_batch = gr.Number(min(8, limits.max_images), label=f"batch (1..{limits.max_images})")
                        c_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                    with gr.Column(scale=2):
                        c_gallery = gr.Gallery(label="side by side", columns=2, format="png", object_fit="contain",
                                               elem_id="compare-gallery", height="auto")
                        c_table = gr.Markdown(elem_id="compare-table")
                        with gr.Accordion("details", open=False):
                            c_info = gr.JSON(label="requests")
            with gr.Tab("Pipelines", id="pipelines"):
                p_pipe = gr.Dropdown(names, value=names[0], label="pipeline", elem_id="pipelines-pipeline")
                p_config = gr.JSON(service.entries[names[0]].summary(), label="configuration",
                                   elem_id="pipelines-config")
                p_all = gr.Textbox(visible=False)  # a JSON string: gradio_client would take a config's "path" key
                # (e.g. rectified flow's path="linear") for a file to download
                p_button = gr.Button("list", visible=False)

        g_pipe.change(lambda n: describe(service, n), g_pipe, g_about, **ui)
        g_button.click(generate, [g_pipe, g_class, g_seed, g_guidance, g_steps, g_batch],
                       [g_gallery, g_time, g_info, generated, selected], api_name="generate", **compute)
        g_gallery.select(select, None, selected, **ui)
        g_send.click(take_generated, [generated, selected], [e_canvas, tabs], **ui)
        e_button.click(edit_canvas, [e_pipe, e_canvas, e_mode, e_class, e_seed, e_guidance, e_num],
                       [e_gallery, e_time, e_info], api_name="edit_canvas", **compute)
        f_button.click(edit_files, [e_pipe, f_image, f_mask, e_mode, e_class, e_seed, e_guidance, e_num],
                       [e_gallery, e_time, e_info], api_name="edit", **compute)
        c_button.click(compare, [c_pipes, c_class, c_seed, c_guidance, c_steps, c_batch],
                       [c_gallery, c_table, c_info], api_name="compare", **compute)
        p_pipe.change(guarded(lambda n: service.entry(n).summary()), p_pipe, p_config, **ui)
        p_button.click(lambda: json.dumps(service.list()), None, p_all, api_name="list", concurrency_id="list")
    return demo


def display_images_pil(image):
    """A native-resolution PIL image scaled up for painting, like the generated ones are shown."""
    factor = max(1, -(-DISPLAY_SIDE // max(image.width, 1)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def _stop(signum, frame):
    raise KeyboardInterrupt


def launch(service: ServeService, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    if host not in LOOPBACK:
        print(f"WARNING: effigen serve is bound to {host}, not loopback: anyone who can reach this machine on port "
              f"{port} can use the page and its API and spend its compute; there is no authentication. Use the "
              "default --host 127.0.0.1 unless you mean it.", file=sys.stderr, flush=True)
    demo = build(service)
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)  # stop like Ctrl-C: Gradio closes the server, atexit removes the cache
    demo.queue(max_size=service.limits.max_queue, default_concurrency_limit=service.limits.concurrency)
    try:
        demo.launch(server_name=host, server_port=port, max_file_size=service.limits.max_upload_bytes,
                    state_session_capacity=STATE_SESSIONS, ssr_mode=False, show_error=True, theme=THEME(), quiet=False,
                    footer_links=["api"], mcp_server=False, prevent_thread_lock=not block)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot serve there ({e}); choose a free port with "
                        "--port") from None
    return demo
