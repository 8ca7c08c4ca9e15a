"""``kandinsky3 serve``: its flags and what it runs. Importing this module is cheap (argparse only); FastAPI,
uvicorn and the model are imported when the command runs.

    kandinsky3 serve --model tiny                        # http://127.0.0.1:7860/ (UI), /sdapi/v1, /v1
    kandinsky3 serve --device cuda:0,cuda:1 --queue-size 16 --api-key "$KEY" --host 0.0.0.0
    kandinsky3 serve --lora-dir loras/                   # prompts may say <lora:FILE_STEM:0.8>
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "run"]

API_KEY_VARIABLE = "KANDINSKY3_API_KEY"  # read when --api-key is not given (keeps the key out of `ps`)
LORA_DIR_VARIABLE = "KANDINSKY3_LORA_DIR"  # read when --lora-dir is not given


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``serve`` and its flags on the ``kandinsky3`` command's subparsers."""
    from kandinsky3.components import DTYPE_NAMES
    from kandinsky3.pipelines.load import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "serve", help="an image server: AUTOMATIC1111 API (/sdapi/v1), OpenAI Images API (/v1) and a web UI (/)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="'tiny' (the bundled model), a folder or a Hub repo")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server")
    parser.add_argument("--port", type=int, default=7860, help="TCP port")
    parser.add_argument("--api-key", default=None,
                        help=f"require this key (Bearer on /v1; Bearer or Basic elsewhere); None: "
                             f"${API_KEY_VARIABLE} if set, else no key")
    parser.add_argument("--device", default="auto",
                        help="device, or a comma-separated list with one worker each (cuda:0,cuda:1)")
    load = parser.add_argument_group("loading (as for generate)")
    load.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="storage dtype; None = chosen per device")
    load.add_argument("--compute-dtype", default=None, choices=DTYPE_NAMES, help="compute dtype; None = fastest")
    load.add_argument("--stream-t5", default="auto", choices=("auto", "yes", "no"), help="stream T5 block by block")
    load.add_argument("--offload", default="auto", choices=("auto", "no", "device", "disk"),
                      help="where components wait between phases")
    load.add_argument("--no-inpainting", action="store_true", help="do not load the inpainting model")
    load.add_argument("--prompt-cache", type=int, default=64, help="encoded prompt batches kept (0: none)")
    load.add_argument("--lora-dir", default=None, metavar="DIR",
                      help=f"a folder of LoRA files (*.safetensors) that prompts name as <lora:FILE_STEM:SCALE>; "
                           f"None: ${LORA_DIR_VARIABLE} if set, else no LoRAs")
    queue = parser.add_argument_group("queue and limits")
    queue.add_argument("--queue-size", type=int, default=8, help="jobs that may wait; more get 429 + Retry-After")
    queue.add_argument("--timeout", type=float, default=600.0,
                       help="seconds from a request to its images (0: no limit)")
    queue.add_argument("--shutdown-grace", type=float, default=30.0,
                       help="seconds the running job gets to finish at shutdown")
    queue.add_argument("--max-side", type=int, default=2048, help="largest width or height in pixels")
    queue.add_argument("--max-steps", type=int, default=150, help="most sampler steps per image")
    queue.add_argument("--max-images", type=int, default=8, help="most images per request (batch × iterations)")
    queue.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB")
    parser.add_argument("--no-ui", action="store_true", help="serve the APIs only")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model once per device, then serve until SIGINT/SIGTERM."""
    import uvicorn

    from kandinsky3.errors import UsageError
    from kandinsky3.pipelines import LoadOptions

    from .app import GracefulServer, ServerConfig, Service, create_app
    from .engine import Engine, Limits

    for name in ("queue_size", "max_side", "max_steps", "max_images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    limits = Limits(max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images)
    config = ServerConfig(queue_size=args.queue_size, timeout=args.timeout if args.timeout > 0 else None,
                          api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None, limits=limits,
                          max_body_bytes=int(args.max_body_mb * 2**20), shutdown_grace=args.shutdown_grace,
                          ui=not args.no_ui)
    options = LoadOptions(dtype=args.dtype, compute_dtype=args.compute_dtype,
                          stream_t5={"auto": None, "yes": True, "no": False}[args.stream_t5],
                          offload={"auto": None, "no": False, "device": True, "disk": "disk"}[args.offload])
    devices = [device.strip() for device in args.device.split(",") if device.strip()]
    lora_dir = args.lora_dir or os.environ.get(LORA_DIR_VARIABLE) or None
    if lora_dir is not None and not os.path.isdir(lora_dir):  # before the model loads
        raise UsageError(f"--lora-dir {lora_dir}: no such folder")
    engines = [Engine.load(args.model, device=device, options=options, inpainting=not args.no_inpainting,
                           prompt_cache=args.prompt_cache, lora_dir=lora_dir) for device in devices]
    service = Service(engines, config)
    uvicorn_config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="info",
                                    timeout_graceful_shutdown=args.shutdown_grace + 10)
    server = GracefulServer(uvicorn_config, service)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"kandinsky3 serve: {engines[0].model_name} on {', '.join(service.queue.runners)} at "
          f"http://{host}:{args.port}/ (UI at /, AUTOMATIC1111 API at /sdapi/v1, OpenAI API at /v1)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it handled again once its graceful shutdown is over
        pass
    print("kandinsky3 serve: stopped", flush=True)
    return 0
