"""`kandinsky3 serve --model tiny` as a user starts it (a subprocess on a free loopback port) under load, a killed
client and a shutdown. Bounded: 8 + 32 requests from 8 clients, all on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

QUEUE_SIZE, CLIENTS, PER_CLIENT = 4, 8, 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The real command; yields (base URL, its process). Stops it with SIGINT and checks it exits cleanly."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "kandinsky3.cli", "serve", "--model", "tiny", "--port", str(port), "--queue-size",
         str(QUEUE_SIZE), "--no-ui", "--device", "cpu", "--shutdown-grace", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "the server did not start: " + "".join(lines)
        try:
            if httpx.get(url + "/sdapi/v1/progress", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url, process, lines
    if process.poll() is None:
        process.kill()


def request_one(url: str, client: int, index: int) -> tuple[str, float, httpx.Response]:
    """One request of the load test: A1111 and OpenAI alternate; each carries a prompt naming it."""
    prompt = f"load test client {client} request {index}"
    started = time.perf_counter()
    if index % 2:
        response = httpx.post(url + "/v1/images/generations", json={"prompt": prompt, "seed": index}, timeout=120)
    else:
        response = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": prompt, "seed": index}, timeout=120)
    return prompt, time.perf_counter() - started, response


def images_of(response: httpx.Response) -> list[Image.Image]:
    body = response.json()
    encoded = body["images"] if "images" in body else [item["b64_json"] for item in body["data"]]
    return [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in encoded]


def load_round(url: str, per_client: int = PER_CLIENT) -> tuple[list, list[int]]:
    """``per_client`` requests from each of 8 concurrent clients while the queue is watched; returns the outcomes
    and the job counts seen."""
    outcomes, counts, stop = [], [], threading.Event()

    def client(number: int) -> None:
        for index in range(per_client):
            outcomes.append(request_one(url, number, index))

    def watch() -> None:
        while not stop.is_set():
            counts.append(httpx.get(url + "/sdapi/v1/progress", timeout=10).json()["state"]["job_count"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    stop.set()
    watcher.join(10)
    return outcomes, counts


def test_load_every_request_ends_in_its_image_or_a_429_within_the_bound_and_memory_stays_flat(served):
    url, process, _ = served
    server = psutil.Process(process.pid)
    load_round(url, per_client=1)  # warm-up: allocator pools, caches
    rss_before = server.memory_info().rss
    outcomes, counts = load_round(url)
    rss_after = server.memory_info().rss
    assert len(outcomes) == CLIENTS * PER_CLIENT
    served_prompts, latencies = [], []
    for prompt, seconds, response in outcomes:
        assert response.status_code in (200, 429), response.text
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            continue
        images = images_of(response)
        assert len(images) == 1 and images[0].text["parameters"].splitlines()[0] == prompt
        served_prompts.append(prompt)
        latencies.append(seconds)
    assert len(served_prompts) == len(set(served_prompts)) >= QUEUE_SIZE + 1  # none duplicated, some served
    assert max(counts) <= QUEUE_SIZE + 1  # waiting + the one running
    assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)
    quantiles = statistics.quantiles(latencies, n=20)
    print(f"\nload: {len(latencies)} served, {len(outcomes) - len(latencies)} refused (429); latency p50 "
          f"{statistics.median(latencies):.2f} s, p95 {quantiles[18]:.2f} s; RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB; most jobs in the queue {max(counts)}")


def test_a_killed_client_leaves_the_server_serving(served):
    url, _, _ = served
    client = subprocess.Popen([sys.executable, "-c", (
        "import httpx, sys; httpx.post(sys.argv[1] + '/sdapi/v1/txt2img', json={'prompt': 'killed', "
        "'n_iter': 8, 'steps': 100, 'sampler_name': 'DDIM'}, timeout=300)"), url])
    deadline = time.monotonic() + 60
    while httpx.get(url + "/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
        assert time.monotonic() < deadline, "the killed client's job never started"
        time.sleep(0.05)
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    deadline = time.monotonic() + 30
    while httpx.get(url + "/sdapi/v1/progress").json()["state"]["job_count"]:
        assert time.monotonic() < deadline, "the killed client's job kept running"
        time.sleep(0.05)
    response = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "after the kill", "steps": 5,
                                                           "sampler_name": "DDIM"}, timeout=60)
    assert response.status_code == 200 and len(images_of(response)) == 1


def test_sigint_lets_the_running_request_finish_refuses_the_waiting_one_and_exits_cleanly(served):
    url, process, lines = served
    results = {}

    def post(name: str, body: dict) -> None:
        results[name] = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120)

    running = threading.Thread(target=post, args=("running", {"prompt": "last", "steps": 60, "n_iter": 3,
                                                              "sampler_name": "DDIM"}))
    running.start()
    deadline = time.monotonic() + 60
    while httpx.get(url + "/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = threading.Thread(target=post, args=("waiting", {"prompt": "never", "steps": 5}))
    waiting.start()
    while httpx.get(url + "/sdapi/v1/progress").json()["state"]["job_count"] < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    running.join(60), waiting.join(60)
    assert results["waiting"].status_code == 503
    assert results["running"].status_code == 200 and len(images_of(results["running"])) == 3
    assert process.wait(30) == 0
    output = "".join(lines)
    assert f"at {url}/" in output and "Traceback" not in output
