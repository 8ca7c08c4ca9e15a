"""The CPU thread count of a ``kandinsky3`` run: PyTorch's own, less the cores other processes keep busy and what
the container's CPU quota forbids; OMP_NUM_THREADS, when set, is the user's choice."""

import pytest
import torch

from kandinsky3 import cli, command


@pytest.fixture
def machine(monkeypatch):
    """``machine(cores, load, quota=None, running=None)``: pretend this process may use ``cores`` CPUs under a
    1-minute load average of ``load``, a cgroup quota of ``quota`` CPUs, and ``running`` threads of other processes
    running now (None: unknown, so the load average counts)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def pretend(cores: int, load: float, quota: float | None = None, running: float | None = None) -> None:
        monkeypatch.setattr(command.os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(command.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(command, "_cgroup_cpus", lambda: quota)
        monkeypatch.setattr(command, "_running_elsewhere", lambda: running)

    return pretend


def test_an_idle_machine_keeps_pytorchs_thread_count(machine):
    machine(cores=8, load=0.3)
    assert command.cpu_threads(default=8) is None


def test_busy_cores_are_left_to_the_processes_that_use_them(machine):
    machine(cores=2, load=1.7)  # the README's first command: 11 s idle, 105-283 s with 2 threads on 2 busy cores
    assert command.cpu_threads(default=2) == 1
    machine(cores=16, load=5.2)
    assert command.cpu_threads(default=16) == 11
    machine(cores=2, load=9.0)
    assert command.cpu_threads(default=2) == 1  # never fewer than one


def test_the_threads_running_now_count_rather_than_the_lagging_load_average(machine):
    """The load average decays over a minute: right after a 2-thread job (say, the previous image) it still says 1.7
    while nothing runs, and right after one starts it says 0.2 while two threads run."""
    machine(cores=2, load=1.7, running=0)
    assert command.cpu_threads(default=2) is None
    machine(cores=2, load=0.2, running=2)
    assert command.cpu_threads(default=2) == 1
    machine(cores=16, load=0.0, running=5)
    assert command.cpu_threads(default=16) == 11


def test_the_running_threads_are_read_from_proc_loadavg(monkeypatch):
    readings = iter(["1.50 1.2 0.9 1/80 100\n", "3.0 1 1 3/80 100\n", "3.0 1 1 2/81 100\n"])
    monkeypatch.setattr(command.Path, "read_text", lambda self: next(readings))
    assert command._running_elsewhere(samples=3, interval=0) == 1.0  # median of 0, 2, 1 others
    monkeypatch.setattr(command.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError("no /proc")))
    assert command._running_elsewhere() is None


def test_the_containers_cpu_quota_caps_the_threads(machine):
    machine(cores=64, load=0.0, quota=1.5)  # docker --cpus 1.5: PyTorch sees 64 cores
    assert command.cpu_threads(default=32) == 2


def test_omp_num_threads_is_the_users_choice(machine, monkeypatch):
    machine(cores=2, load=1.9)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert command.cpu_threads(default=2) is None


def test_every_command_applies_the_choice_before_it_runs(machine, monkeypatch, capsys):
    machine(cores=4, load=2.0)
    chosen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(cli, "run_generate", lambda args: len(chosen))
    assert cli.main(["generate", "a"]) == 1 and chosen == [2]
    monkeypatch.setattr(cli, "_train", lambda argv: len(chosen))
    assert cli.main(["train", "config.json"]) == 2 and chosen == [2, 2]
