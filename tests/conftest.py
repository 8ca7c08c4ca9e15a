"""Shared by every test: under pytest-xdist (the README runs the fast tier as ``-n 2``), each worker process uses one
torch thread, and so do the processes its tests start; two workers with two threads each would oversubscribe the
cores and run slower than one worker."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
