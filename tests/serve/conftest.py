"""A real server for the tests: uvicorn on a free loopback port, in a thread, over the bundled tiny model."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from kandinsky3.serve.app import ServerConfig, Service, create_app  # noqa: E402
from kandinsky3.serve.engine import Engine, Limits  # noqa: E402


def write_random_lora(path, unet, text_encoder, targets: tuple[str, ...], seed: int, base=None) -> None:
    """A LoRA file for ``unet`` (or for ``base``, another identity) with random non-zero weights (peft starts B at
    0, which would hide every mistake); the modules stay plain."""
    import torch

    from kandinsky3 import lora

    spec = lora.LoraSpec(rank=4, alpha=4.0, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora.inject_lora(unet, text_encoder, spec, "made", trainable=True):
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    lora.save_lora(path, unet, text_encoder, "made", spec=spec, base=base or lora.base_identity(unet, "tiny"),
                   trigger_words=("sks",))
    lora.unload_lora(unet, text_encoder)


@dataclass
class Running:
    url: str
    host: str
    port: int
    service: Service
    api_key: str | None


def start_server(service: Service) -> tuple[uvicorn.Server, threading.Thread, Running]:
    """Serve ``service`` on 127.0.0.1 at a port the OS picks; returns once it accepts connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    return server, thread, Running(f"http://127.0.0.1:{port}", "127.0.0.1", port, service, service.config.api_key)


def stop_server(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(30)
    assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    return Engine.load("tiny", device="cpu")


@pytest.fixture(scope="module")
def server(tiny_engine):
    """The tiny model behind the API key, no UI, a queue of 4."""
    limits = Limits(max_side=512, max_steps=60, max_images=4)
    service = Service([tiny_engine], ServerConfig(queue_size=4, api_key="test-key-123", timeout=120, limits=limits,
                                                  max_body_bytes=4 * 2**20, ui=False))
    server, thread, running = start_server(service)
    yield running
    stop_server(server, thread)


def gated_service(engine: Engine, gate: threading.Event, **config) -> Service:
    """A service whose worker waits for ``gate`` before running each job: tests hold jobs where they want."""
    service = Service([engine], ServerConfig(ui=False, **config))
    for name, run in list(service.queue.runners.items()):
        def held(job, run=run):
            gate.wait(60)
            return run(job)

        service.queue.runners[name] = held
    return service


def wait_for(condition, seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
