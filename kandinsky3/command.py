"""How the ``kandinsky3`` command runs a subcommand: its CPU thread count, its exit status, and what it says when
something goes wrong.

Exit status: 0 done; 2 the user's mistake (a :class:`~kandinsky3.errors.UsageError`, a checkpoint or input file
that cannot be used, a file that cannot be read or written), said in one line on stderr; 1 anything else (a bug,
an out-of-memory error), said in one line that names a log file holding the traceback; 130 interrupted (Ctrl-C),
said in one line with what is left. ``-v``/``--debug`` also prints the traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["cpu_threads", "guarded", "set_threads"]

_IMAGES_KEPT = "; the images listed above are complete, and no partial file was left"
_INTERRUPTED = {  # what an interrupted subcommand tells the user
    "train": "; run the same command with --resume to continue from the last saved checkpoint",
    "generate": _IMAGES_KEPT, "inpaint": _IMAGES_KEPT, "img2img": _IMAGES_KEPT,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix: the library's checks, files that cannot be read or written,
    input files that are not what they claim, sampling that overflowed (its message says what to change)."""
    from PIL import UnidentifiedImageError

    from kandinsky3.errors import NonFiniteError, UsageError
    from kandinsky3.weights import CheckpointError

    return (UsageError, CheckpointError, NonFiniteError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, UnidentifiedImageError, json.JSONDecodeError)


def _error_log(name: str, argv: Sequence[str]) -> Path | None:
    """A log file (in the temporary folder) holding the command line, versions and the current traceback."""
    import platform

    import torch

    from kandinsky3 import __version__

    try:
        with tempfile.NamedTemporaryFile("w", prefix=f"kandinsky3-{name}-", suffix=".log", delete=False,
                                         encoding="utf-8") as log:
            log.write(f"kandinsky3 {' '.join(argv)}\nkandinsky3 {__version__}, torch {torch.__version__}, "
                      f"python {platform.python_version()}, {platform.platform()}\n\n{traceback.format_exc()}")
            return Path(log.name)
    except OSError:
        return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def guarded(name: str, run: Callable[[], int], argv: Sequence[str], verbose: bool) -> int:
    """``run()``'s exit status; an exception becomes one line on stderr and its status (see the module docstring)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"kandinsky3 {name}: interrupted{_INTERRUPTED.get(name, '')}", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if verbose:
            traceback.print_exc()
        print(f"kandinsky3 {name}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if verbose:
            traceback.print_exc()
        log = _error_log(name, argv)
        where = f"the traceback is in {log}" if log else "no log file could be written"
        print(f"kandinsky3 {name}: failed: {type(error).__name__}: {_one_line(error)} ({where}; -v prints it here)",
              file=sys.stderr)
        return 1


def _cgroup_cpus() -> float | None:
    """CPUs the cgroup (v2) quota allows, e.g. 2.0 in a container started with --cpus 2; None: unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _running_elsewhere(samples: int = 5, interval: float = 0.01) -> float | None:
    """Threads of other processes running right now: the median over a few readings, ``interval`` seconds apart,
    of the runnable count in /proc/loadavg (its 4th field, "running/total"), less this reading thread; None where
    there is no /proc/loadavg."""
    counts = []
    for index in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if index < samples - 1:
            time.sleep(interval)
    return float(sorted(counts)[len(counts) // 2])


def cpu_threads(default: int) -> int | None:
    """The CPU thread count for this run, or None to keep PyTorch's ``default`` (OMP_NUM_THREADS when set, else
    the physical cores this process may use).

    PyTorch counts the cores it may use, not the cores that are free: on a shared machine its threads wait on
    each other behind other processes (the README's first command took 11 s on 2 idle cores, 105-283 s with 2
    threads on 2 busy ones). So the count is capped by the cores other processes leave free (the cores this
    process may use minus the busy ones, rounded) and by the container's CPU quota (cgroup cpu.max), and is at
    least 1. Busy is the other processes' threads running now (:func:`_running_elsewhere`, 40 ms of readings), or
    where that cannot be read the 1-minute load average, which lags: a job that ended seconds ago (the previous run
    of this command) still counts in it, and one that started seconds ago does not yet. OMP_NUM_THREADS, when set,
    is the user's choice and is kept.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = _running_elsewhere()
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = cores - busy
    quota = _cgroup_cpus()
    threads = max(1, min(default, round(free), math.ceil(quota) if quota else default))
    return None if threads == default else threads


def set_threads() -> None:
    """Apply :func:`cpu_threads` to PyTorch, saying so in one line when it lowers the count."""
    import torch

    default = torch.get_num_threads()
    threads = cpu_threads(default)
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info("using %d CPU thread(s) of %d: the other cores are busy or outside this process's quota; set "
                    "OMP_NUM_THREADS to choose", threads, default)
