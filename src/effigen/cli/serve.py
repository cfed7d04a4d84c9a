"""`effigen serve`: a web page (Gradio) that generates, edits and compares with the pipeline folders it is given.

    effigen serve --pipelines runs/mnist-dit/final runs/mnist-var/final
    effigen serve --pipelines runs                        # every runs/<name>/final (or runs/<name>) pipeline folder
    effigen serve --pipelines DIR --host 0.0.0.0 --port 8000   # reachable from other machines (a warning is printed)

Tabs: Generate (pipeline, class, seed, guidance, steps, batch -> the images and the time it took), Edit (upload an
image or take a generated one, paint the region on it, inpaint or outpaint with any pipeline that supports
`Pipeline.edit`: VAR, HMAR), Compare (the same request on several pipelines, side by side, with their images/s) and
Pipelines (each folder's method, components, sampler and objective settings). The same functions are Gradio API
endpoints (`/generate`, `/edit`, `/compare`, `/list`) that `gradio_client` calls; see docs/serve.md.

Bounded and safe by default: requests wait in one queue of at most --max-queue requests (more are refused, not
crashed on), at most --concurrency of them run at once, and each may ask for at most --max-images images and
--max-steps steps; uploads must be PNG/JPEG/WebP/BMP/GIF images of at most --max-upload-mb MB and
--max-upload-side px a side. Every field is checked and a bad one is answered with a message in the page (a Gradio
error), never a traceback; a failed generation is reported the same way and the server keeps serving. Pipelines
are named by their folder and chosen by that name from the folders loaded at start: a request never names a path.
The server binds to 127.0.0.1 unless --host says otherwise, and warns when it does. Gradio is an optional
dependency: `pip install 'effigen[serve]'` (`bash scripts/setup.sh --serve` or `--test` installs it).

The checks and the work are `effigen.cli.serve_service` (Gradio-free); the page is `effigen.cli.serve_app`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math

import torch

from ..config import UserError
from .main import positive_int, select_device_flag
from .serve_service import Limits, ServeService


# ------------------------------------------------------------------------------------------------ command
def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", required=True, metavar="DIR",
                        help="pipeline folders, or folders holding them (e.g. runs/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    defaults = Limits()
    parser.add_argument("--max-images", type=positive_int, default=defaults.max_images,
                        help=f"images per request (default {defaults.max_images})")
    parser.add_argument("--max-steps", type=positive_int, default=defaults.max_steps,
                        help=f"sampling steps per request (default {defaults.max_steps})")
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                        help="largest upload in MB (default 5)")
    parser.add_argument("--max-upload-side", type=positive_int, default=defaults.max_upload_side,
                        help=f"largest side of an uploaded image in px (default {defaults.max_upload_side})")
    parser.add_argument("--concurrency", type=positive_int, default=defaults.concurrency,
                        help=f"requests computing at once (default {defaults.concurrency})")
    parser.add_argument("--max-queue", type=positive_int, default=defaults.max_queue,
                        help=f"requests waiting at most; more are refused (default {defaults.max_queue})")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        parser.error(f"--max-upload-mb must be a positive number, got {args.max_upload_mb}")
    limits = Limits(max_images=args.max_images, max_steps=args.max_steps,
                    max_upload_bytes=int(args.max_upload_mb * 2**20), max_upload_side=args.max_upload_side,
                    concurrency=args.concurrency, max_queue=args.max_queue)
    if importlib.util.find_spec("gradio") is None:
        raise UserError("effigen serve needs Gradio, which is not installed; install it with "
                        "pip install 'effigen[serve]' (or bash scripts/setup.sh --serve)")
    from . import serve_app  # imports gradio
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = select_device_flag(args.device)
    service = ServeService.from_folders(args.pipelines, device, limits)
    for name, entry in service.entries.items():
        edit = ", edits" if entry.can_edit else ""
        print(f"serving {name} ({entry.pipeline.method.name}, {entry.pipeline.sample_shape[-1]} px{edit}) "
              f"from {entry.folder}")
    serve_app.launch(service, args.host, args.port)
    return 0
