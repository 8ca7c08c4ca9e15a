"""The job queue alone (no HTTP, no model): bound, order, progress, cancel/interrupt/skip, timeout, shutdown."""

import asyncio
import threading
import time

import pytest

from kandinsky3.serve.jobs import JobCancelled, JobInterrupted, JobQueue, QueueFull, ShuttingDown, SkipBatch


def stepping_runner(steps=5, delay=0.01, gate: threading.Event | None = None):
    """A runner that takes ``steps`` steps of ``delay`` s (after ``gate`` opens) and returns its request and the
    batches it finished; ``skip()`` drops the current batch of two."""

    def run(job):
        if gate is not None:
            gate.wait(10)
        finished = []
        for batch in range(2):
            try:
                for step in range(steps):
                    job.checkpoint()
                    time.sleep(delay)
                    job.set_progress(batch * steps + step + 1, 2 * steps)
                finished.append(batch)
            except SkipBatch:
                continue
            except JobInterrupted:
                if finished:
                    return job.request, finished
                raise
        return job.request, finished

    return run


def wait_until_running(job, seconds=5.0):
    deadline = time.monotonic() + seconds
    while job.status != "running":
        assert time.monotonic() < deadline, f"{job} never started"
        time.sleep(0.005)


def test_jobs_run_in_order_and_report_their_progress():
    queue = JobQueue({"cpu": stepping_runner()}, max_waiting=8)
    queue.start()
    jobs = [queue.submit(i) for i in range(4)]
    assert [job.result(5)[0] for job in jobs] == [0, 1, 2, 3]
    assert all(job.status == "done" and job.progress.fraction == 1.0 for job in jobs)
    assert jobs[0].finished <= jobs[1].started
    queue.shutdown(grace=1)


def test_a_full_queue_refuses_with_a_retry_hint_and_never_holds_more_than_its_bound():
    gate = threading.Event()
    queue = JobQueue({"cpu": stepping_runner(gate=gate)}, max_waiting=2)
    queue.start()
    wait_until_running(queue.submit("running"))
    queue.submit("a"), queue.submit("b")
    with pytest.raises(QueueFull) as full:
        queue.submit("c")
    assert full.value.retry_after >= 1
    state = queue.state()
    assert (state.waiting, len(state.running), state.job_count) == (2, 1, 3)
    gate.set()
    queue.shutdown(grace=5)


def test_cancelling_a_waiting_job_drops_it_and_a_running_one_stops_at_its_next_step():
    gate = threading.Event()
    queue = JobQueue({"cpu": stepping_runner(steps=200, gate=gate)}, max_waiting=4)
    queue.start()
    running, waiting = queue.submit("r"), queue.submit("w")
    wait_until_running(running)
    waiting.cancel("client disconnected")
    assert waiting.status == "cancelled" and queue.state().waiting == 0
    with pytest.raises(JobCancelled, match="client disconnected"):
        waiting.result(1)
    gate.set()
    running.cancel("client disconnected")
    with pytest.raises(JobCancelled):
        running.result(5)
    assert running.progress.step < 400
    queue.shutdown(grace=1)


def test_interrupt_keeps_finished_batches_and_skip_drops_only_the_current_one():
    queue = JobQueue({"cpu": stepping_runner(steps=30, delay=0.01)}, max_waiting=4)
    queue.start()
    job = queue.submit("x")
    while job.progress.step < 2:
        time.sleep(0.005)
    job.skip()
    assert job.result(5) == ("x", [1])
    job = queue.submit("y")
    while job.progress.step < 32:
        time.sleep(0.005)
    job.interrupt()
    assert job.result(5) == ("y", [0])
    job = queue.submit("z")
    job.interrupt()
    with pytest.raises(JobInterrupted):
        job.result(5)
    queue.shutdown(grace=1)


def test_a_job_past_its_timeout_is_cancelled_waiting_or_running():
    queue = JobQueue({"cpu": stepping_runner(steps=1000)}, max_waiting=4, timeout=0.2)
    queue.start()
    running, waiting = queue.submit("r"), queue.submit("w")
    for job in (running, waiting):
        with pytest.raises(JobCancelled, match="timed out"):
            job.result(5)
    queue.shutdown(grace=1)


def test_shutdown_ends_waiting_jobs_refuses_new_ones_and_stops_the_running_one_after_the_grace():
    queue = JobQueue({"cpu": stepping_runner(steps=10_000)}, max_waiting=4)
    queue.start()
    running, waiting = queue.submit("r"), queue.submit("w")
    wait_until_running(running)
    started = time.monotonic()
    queue.shutdown(grace=0.2)
    assert time.monotonic() - started < 3
    with pytest.raises(ShuttingDown):
        waiting.result(0)
    with pytest.raises(JobCancelled, match="shutting down"):
        running.result(0)
    with pytest.raises(ShuttingDown):
        queue.submit("late")


def test_a_runner_error_is_the_jobs_error_and_the_worker_keeps_serving():
    def run(job):
        if job.request == "bad":
            raise ValueError("bad request")
        return "ok"

    queue = JobQueue({"cpu": run}, max_waiting=4)
    queue.start()
    bad, good = queue.submit("bad"), queue.submit("good")
    with pytest.raises(ValueError, match="bad request"):
        bad.result(5)
    assert good.result(5) == "ok" and bad.status == "failed"
    queue.shutdown(grace=1)


def test_wait_lets_an_event_loop_poll_a_job_without_blocking():
    queue = JobQueue({"cpu": stepping_runner(steps=20)}, max_waiting=4)
    queue.start()
    job = queue.submit("a")

    async def poll():
        ticks = 0
        while not await job.wait(0.01):
            ticks += 1
        return ticks

    assert asyncio.run(poll()) > 0 and job.result(0)[0] == "a"
    queue.shutdown(grace=1)
