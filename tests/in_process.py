"""Commands run in the test process: `cascade-studio ARGS` through the CLI's `main()` (the function the console script
calls) and `python bench/SCRIPT ARGS` through runpy.

A process of their own spends about 5 s importing torch, diffusers and transformers before it does anything. These
give the same exit code, stdout and stderr, with the environment asked for, and put back what a command may change
for the tests after it: torch's thread count, the environment, the working folder, sys.argv and sys.path. Commands
that must start fresh stay processes: the server, anything that reads the environment on import (HF_HUB_OFFLINE),
and the benchmarks that compile (torch.compile leaves global state behind).
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from subprocess import CompletedProcess

import torch


@contextlib.contextmanager
def _as_a_process(cwd: Path | None, env: dict[str, str]) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with (
            contextlib.chdir(cwd or Path.cwd()),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            yield out, err
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli(args: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> CompletedProcess:
    """`cascade-studio ARGS`; an error the CLI does not catch fails the test with its traceback."""
    from cascade_studio.cli import main

    with _as_a_process(cwd, env or {}) as (out, err):
        code = main(list(args))
    return CompletedProcess(["cascade-studio", *args], code, out.getvalue(), err.getvalue())


def script(path: Path, args: Sequence[str], env: dict[str, str] | None = None) -> CompletedProcess:
    """`python PATH ARGS`: the script's folder first on sys.path, as Python puts it; its exit code from SystemExit."""
    argv, sys.argv = sys.argv, [str(path), *map(str, args)]
    sys.path.insert(0, str(path.parent))
    code = 0
    try:
        with _as_a_process(None, env or {}) as (out, err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        sys.path.remove(str(path.parent))
    return CompletedProcess([str(path), *args], code, out.getvalue(), err.getvalue())
