"""The server under control: progress, interrupt, disconnects, timeouts, shutdown, the prompt cache."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from conftest import gated_service, start_server, stop_server, wait_for


def post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(httpx.post(url, json=body, timeout=60)), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def gated(tiny_engine):
    """A server whose jobs wait at a gate; yields (running server, gate)."""
    gate = threading.Event()
    server, thread, running = start_server(gated_service(tiny_engine, gate, queue_size=1, timeout=60))
    yield running, gate
    gate.set()
    stop_server(server, thread)


QUICK = {"prompt": "a red circle", "steps": 2, "sampler_name": "DDIM", "width": 64, "height": 64}


def test_progress_moves_while_a_job_runs_and_interrupt_keeps_the_finished_batch(server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    results = []
    body = {**QUICK, "steps": 60, "n_iter": 4}
    thread = threading.Thread(target=lambda: results.append(httpx.post(
        server.url + "/sdapi/v1/txt2img", json=body, headers=auth, timeout=120)), daemon=True)
    thread.start()
    seen = []

    def past_first_batch():
        state = httpx.get(server.url + "/sdapi/v1/progress", headers=auth).json()
        seen.append(state)
        return state["state"]["sampling_step"] > 70

    wait_for(past_first_batch, what="the second batch")
    assert httpx.post(server.url + "/sdapi/v1/interrupt", headers=auth).status_code == 200
    thread.join(60)
    running = [s for s in seen if s["state"]["job_count"] == 1]
    steps = [s["state"]["sampling_step"] for s in running]
    assert steps == sorted(steps) and len(set(steps)) > 3 and running[-1]["state"]["sampling_steps"] == 240
    assert 0 < running[-1]["progress"] < 1
    answer = results[0].json()
    info = json.loads(answer["info"])
    assert results[0].status_code == 200 and info["interrupted"] and 1 <= len(answer["images"]) < 4


def test_a_client_that_disconnects_has_its_queued_job_dropped(gated):
    running, gate = gated
    results = []
    first = post_in_thread(running.url + "/sdapi/v1/txt2img", QUICK, results)
    wait_for(lambda: len(running.service.queue.state().running) == 1, what="the first job to start")
    payload = json.dumps(QUICK).encode()
    with socket.create_connection((running.host, running.port)) as client:
        client.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        wait_for(lambda: running.service.queue.state().waiting == 1, what="the second job to queue")
    wait_for(lambda: running.service.queue.state().waiting == 0, what="the dropped job")  # the client left
    again = post_in_thread(running.url + "/sdapi/v1/txt2img", QUICK, results)  # its slot is free: queued, no 429
    wait_for(lambda: running.service.queue.state().waiting == 1, what="the next job to queue")
    gate.set()
    first.join(60), again.join(60)
    assert [r.status_code for r in results] == [200, 200]


def test_a_full_queue_answers_429_with_retry_after(gated):
    running, gate = gated
    results = []
    threads = [post_in_thread(running.url + "/sdapi/v1/txt2img", QUICK, results)]
    wait_for(lambda: len(running.service.queue.state().running) == 1, what="the first job to start")
    threads.append(post_in_thread(running.url + "/v1/images/generations", {"prompt": "x"}, results))
    wait_for(lambda: running.service.queue.state().waiting == 1, what="the second job to queue")
    refused = httpx.post(running.url + "/v1/images/generations", json={"prompt": "x"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    gate.set()
    for thread in threads:
        thread.join(60)
    assert sorted(r.status_code for r in results) == [200, 200]


def test_a_request_past_the_timeout_ends_in_a_504(tiny_engine):
    gate = threading.Event()
    server, thread, running = start_server(gated_service(tiny_engine, gate, queue_size=2, timeout=0.5))
    try:
        results = []
        post_in_thread(running.url + "/sdapi/v1/txt2img", QUICK, results).join(0.1)
        waiting = post_in_thread(running.url + "/sdapi/v1/txt2img", QUICK, results)
        waiting.join(30)  # both answers come at the deadline, while the worker is still held
        assert [r.status_code for r in results] == [504, 504]
        assert all("timed out" in r.json()["detail"] for r in results)
        gate.set()  # the running job reaches its first step after its deadline and stops there
        wait_for(lambda: running.service.queue.state().job_count == 0, what="the queue to empty")
    finally:
        gate.set()
        stop_server(server, thread)


def test_shutdown_answers_waiting_requests_with_503_and_lets_the_running_one_finish(tiny_engine):
    gate = threading.Event()
    server, thread, running = start_server(gated_service(tiny_engine, gate, queue_size=2, shutdown_grace=30))
    results = []
    threads = [post_in_thread(running.url + "/sdapi/v1/txt2img", {**QUICK, "prompt": "first"}, results)]
    wait_for(lambda: len(running.service.queue.state().running) == 1, what="the first job to start")
    threads.append(post_in_thread(running.url + "/sdapi/v1/txt2img", {**QUICK, "prompt": "second"}, results))
    wait_for(lambda: running.service.queue.state().waiting == 1, what="the second job to queue")
    closer = threading.Thread(target=running.service.queue.shutdown, args=(30,))
    closer.start()
    wait_for(lambda: len(results) == 1, what="the waiting request's answer")
    assert results[0].status_code == 503 and "shutting down" in results[0].json()["detail"]
    gate.set()
    threads[0].join(30)
    closer.join(30)
    assert results[1].status_code == 200 and json.loads(results[1].json()["info"])["prompt"] == "first"
    stop_server(server, thread)


def test_repeated_prompts_are_encoded_once(server):
    cache = server.service.engine.text_to_image.text_encoder.encode_tokens
    auth = {"Authorization": f"Bearer {server.api_key}"}
    body = {**QUICK, "prompt": "a prompt seen twice", "seed": 3}
    before = (cache.hits, cache.misses)
    answers = [httpx.post(server.url + "/sdapi/v1/txt2img", json=body, headers=auth, timeout=60).json()
               for _ in range(2)]
    assert (cache.hits - before[0], cache.misses - before[1]) == (1, 1)  # T5 ran for the first request only
    assert answers[0]["images"] == answers[1]["images"]


def test_skip_drops_the_batch_being_sampled_and_goes_on_with_the_next(server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    results = []
    body = {**QUICK, "steps": 60, "n_iter": 2, "seed": 10}
    thread = threading.Thread(target=lambda: results.append(httpx.post(
        server.url + "/sdapi/v1/txt2img", json=body, headers=auth, timeout=120)), daemon=True)
    thread.start()
    wait_for(lambda: 5 < httpx.get(server.url + "/sdapi/v1/progress", headers=auth).json()["state"]
             ["sampling_step"] < 50, what="the first batch")
    assert httpx.post(server.url + "/sdapi/v1/skip", headers=auth).status_code == 200
    thread.join(60)
    answer = results[0].json()
    assert len(answer["images"]) == 1 and json.loads(answer["info"])["all_seeds"] == [11]
