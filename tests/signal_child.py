"""The process the interruption tests of test_reliability.py and test_limits.py signal: ``collabcompress compress``
with one phase made slow, which touches a marker file when that phase starts, so that the
signal lands where the test wants it without guessing from wall time.

Forked from the test process, which imported torch and the package already
(``multiprocessing``'s "fork"): each run is a real, separate process with its own signal
dispositions and standard streams, set here as a fresh interpreter has them, without paying
the 2 s of importing torch again. Torch runs on one thread in the child (a forked OpenMP pool
must not be reused).
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

import torch

import collabcompress.commands.compress as c
import collabcompress.commands.export as export
import collabcompress.methods.collaborative as collaborative
from collabcompress import cli


def run(argv: list[str], marker: str, phase: str, stderr: str) -> None:
    """Run the CLI with ``argv`` in this process; stderr goes to the file ``stderr``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a parent that ignores SIGINT does not matter
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, even when the tests run under nohup
    os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not the parent's capture
    torch.set_num_threads(1)
    flag = pathlib.Path(marker)
    if phase == "decompose":
        def cp_als(*args, **kwargs):  # a layer whose decomposition never ends: only abandoning it stops the run
            flag.touch()
            while True:  # idle, so that waiting for the signal costs no CPU
                time.sleep(0.01)

        collaborative.cp_als = cp_als
    else:
        module = export if phase == "export" else c  # "write": compress's output; "export": export's
        real_write = module.write_safetensors

        def write_safetensors(path, entries, metadata):  # a slow disk: 50 ms per tensor
            def slow(load):
                def read():
                    flag.touch()
                    time.sleep(0.05)
                    return load()
                return read
            return real_write(path, [(n, s, d, slow(load)) for n, s, d, load in entries], metadata)

        module.write_safetensors = write_safetensors
    sys.argv = ["collabcompress", *argv]
    cli.main()


def start(argv: list[str], marker: pathlib.Path, phase: str, stderr: pathlib.Path):
    """Fork a child running ``argv`` with ``phase`` made slow; return it once that phase has
    started (the marker exists) and well inside it; fail the test if it never starts."""
    import multiprocessing

    import pytest

    proc = multiprocessing.get_context("fork").Process(target=run, args=(argv, str(marker), phase, str(stderr)))
    proc.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            proc.join()
            pytest.fail(f"the {phase} phase never started: {stderr.read_text(errors='replace')[-2000:]}")
        time.sleep(0.01)
    time.sleep(0.2)  # well inside the phase
    return proc
