"""Run many ``clframe`` command lines for the price of one interpreter start.

A fresh ``python -m clframe`` spends seconds importing torch, timm and mlflow. This script imports
them once, then runs each command line in its own forked child: a real process with its own
working directory, exit code, stdout and stderr, entering through ``clframe.cli.main`` exactly as
the console script does. An exception escaping ``main`` is printed as Python would (a traceback
on stderr, exit code 1), so a test sees what a user would.

    python cli_batch.py CASES.json RESULTS.json

CASES: a list of ``{"argv": [...], "cwd": DIR}``; RESULTS: a list of ``{"code", "stdout", "stderr"}``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def preload() -> None:
    import torch

    torch.set_num_threads(1)
    import huggingface_hub  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import timm  # noqa: F401

    import clframe.cli  # noqa: F401
    import clframe.runner  # noqa: F401
    from clframe.registry import load_builtins

    load_builtins()


def child(case: dict, out_path: str, err_path: str) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.chdir(case["cwd"])
        for fd, path in ((1, out_path), (2, err_path)):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.argv = ["clframe", *case["argv"]]
        from clframe.cli import main

        try:
            main(case["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - report it as the interpreter would
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    cases_path, results_path = (os.path.abspath(p) for p in sys.argv[1:3])
    with open(cases_path) as handle:
        cases = json.load(handle)
    preload()
    results = []
    for k, case in enumerate(cases):
        out_path, err_path = f"{results_path}.{k}.out", f"{results_path}.{k}.err"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(case, out_path, err_path)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with open(out_path) as out, open(err_path) as err:
            results.append({"code": code, "stdout": out.read(), "stderr": err.read()})
    with open(results_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
