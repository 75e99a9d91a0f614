"""Issue 18 (reliability, round two) and issue 19 items 10-11: races, run lifecycle, silent data
damage, and errors that must be one line.

Every CLI case runs in one plan (``PLAN``) executed by this file as a script: it imports torch,
timm and mlflow once, then forks one real process per case (entering through ``clframe.cli.main``
via tests/cli_batch.py, with its own working directory, environment, exit code and output).
Cases of one wave run at the same time; waves run in turn. Kill points are injected through
``CLFRAME_TEST_KILL_AT`` (clframe.runfiles.kill_point), so a process stops exactly where a test
needs it: SIGKILL during a checkpoint write, SIGTERM while its MLflow run is being created,
SIGSTOP after task 1 (the driver waits for the stop, so a second process meets a live owner).
The concurrent-start race forks four runs into an empty folder, released together by a barrier.
Read-only folders, an immutable store and a full disk use bind/tmpfs mounts: root only.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
TINY_KWARGS = "{patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, weight_init: moco}"
TINY = ["--set", f"model_kwargs={TINY_KWARGS}", "--set", "image_size=16", "--set", "epochs=1", "--no-progress"]
TWO_TASKS = [*TINY, "--set", "split_digits.n_tasks=2"]
# The run whose checkpoint size the full-disk case is sized by: the same config there.
SIZED = ["run", "--strategy", "finetune", *TWO_TASKS]
KILL = "CLFRAME_TEST_KILL_AT"
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----- the driver (this file run as a script) -----
def _resolve(arg: str) -> str:
    """``{last.pt:DIR}`` -> the one checkpoint under DIR, found when the case starts."""
    if arg.startswith("{last.pt:"):
        found = sorted(Path(arg[len("{last.pt:"):-1]).rglob("last.pt"))
        return str(found[0]) if len(found) == 1 else f"<{len(found)} checkpoints>"
    return arg


def _fork(case: dict, results: Path, barrier: Path | None) -> int:
    from cli_batch import child

    pid = os.fork()
    if pid == 0:
        os.environ.update(case.get("env", {}))
        while barrier is not None and not barrier.exists():  # released together
            time.sleep(0.0005)
        child(dict(case, argv=[_resolve(a) for a in case["argv"]]), f"{results}.{case['name']}.out",
              f"{results}.{case['name']}.err")
    return pid


def _collect(name: str, status: int, results: Path) -> dict:
    out, err = (Path(f"{results}.{name}.{kind}") for kind in ("out", "err"))
    return {"code": os.waitstatus_to_exitcode(status), "stdout": out.read_text() if out.exists() else "",
            "stderr": err.read_text() if err.exists() else ""}


def driver(plan_path: str, results_path: str) -> None:
    from cli_batch import preload

    plan, results = json.loads(Path(plan_path).read_text()), Path(results_path).absolute()
    preload()
    outcome: dict[str, dict] = {}
    stopped: dict[str, int] = {}
    for step in plan:
        if "sh" in step:
            subprocess.run(step["sh"], shell=True, check=True, cwd=step.get("cwd"))
        elif "stores" in step:  # copies of one empty store: making its tables costs a run ~2 s of CPU
            from mlflow.tracking import MlflowClient

            template = Path(step["stores"][0]).parent / "template.db"
            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
            for path in step["stores"]:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(template, path)
        elif "kill" in step:  # SIGKILL a process that stopped itself, and reap it
            pid = stopped.pop(step["kill"])
            os.kill(pid, signal.SIGKILL)
            outcome[step["kill"]] = _collect(step["kill"], os.waitpid(pid, 0)[1], results)
        else:
            barrier = Path(step["barrier"]) if step.get("barrier") else None
            pids = {case["name"]: (_fork(case, results, barrier), case) for case in step["cases"]}
            if barrier is not None:
                time.sleep(0.2)
                barrier.touch()
            for name, (pid, case) in pids.items():
                _, status = os.waitpid(pid, os.WUNTRACED)
                if os.WIFSTOPPED(status):
                    stopped[name] = pid  # alive, holding what it holds, until a "kill" step
                else:
                    outcome[name] = _collect(name, status, results)
    for pid in stopped.values():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    results.write_text(json.dumps(outcome))


# ----- the plan -----
class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """Answers 200 'OK' to everything, /health included: a web server, not an MLflow server."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_PATCH = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def _image_folders(root: Path, classes: int, per_class: int, seed: int = 0, start: int = 0) -> None:
    from PIL import Image

    rng = np.random.RandomState(seed)
    for k in range(classes):
        for i in range(start, start + per_class):
            pixels = np.clip(np.array([60 * k, 255 - 60 * k, 90]) + rng.randint(-20, 21, (10, 10, 3)), 0, 255)
            path = root / f"class_{k}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)


def _case(name: str, argv: list[str], cwd: Path, **env: str) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    return {"name": name, "argv": argv, "cwd": str(cwd), "env": env}


FOLDERS = ["--scenario", "folder_classes", "--set", "folder_classes.n_tasks=2", "--set", "folder_classes.image_size=8",
           "--set", "folder_classes.workers=1"]


def build_plan(root: Path, http_uri: str, mounts: dict[str, Path]) -> list[dict]:
    bad = root / "bad"
    for name in ("db-random", "db-half", "compare-random"):
        (bad / name).mkdir(parents=True)
    (bad / "db-random" / "mlflow.db").write_bytes(np.random.RandomState(0).bytes(50_000))
    (bad / "compare-random" / "mlflow.db").write_bytes(b"SQLite format 3\0" + np.random.RandomState(1).bytes(9_000))
    (bad / "impossible").mkdir(parents=True)
    (bad / "impossible" / "afile").write_text("a file, not a folder")
    _image_folders(root / "data" / "imgs", classes=4, per_class=6)
    _image_folders(bad / "few" / "imgs", classes=2, per_class=1)
    for domain, cls in (("photo", "cat"), ("sketch", "dog")):
        _image_folders(bad / "disjoint" / "root" / domain, classes=1, per_class=3)
        (bad / "disjoint" / "root" / domain / "class_0").rename(bad / "disjoint" / "root" / domain / cls)
    # 1: four runs released together into an empty folder (no store yet)
    wave1 = [_case(f"race-{seed}", ["run", *TWO_TASKS, "--seed", str(seed)], root / "race") for seed in range(4)]
    wave1 += [
        # 2 (and 10): SIGKILL after the last checkpoint, before the run is ended; relative store and checkpoints
        _case("end", ["run", *TWO_TASKS], root / "end", **{KILL: "before_end"}),
        # low: a kill during a checkpoint write leaves an orphan .tmp-*.pt
        _case("tmp", ["run", *TWO_TASKS], root / "tmp", **{KILL: "checkpoint_written"}),
        # low: SIGTERM while the run is being created
        _case("create", ["run", *TWO_TASKS], root / "create", **{KILL: "run_creating@SIGTERM"}),
        # 5: a run that stays alive (stopped) after task 1, holding its lock
        _case("lock", SIZED, root / "lock", **{KILL: "after_task_1@SIGSTOP"}),
        # 4: killed after task 1 on folder data that will then change
        _case("data", ["run", *FOLDERS, "--data-root", "imgs", *TINY], root / "data", **{KILL: "after_task_1"}),
    ]
    one_line = {  # (arguments after `clframe run`, the folder) -> must fail in one line, writing nothing
        "seed-negative": ["--seed", "-1"], "seed-too-big": ["--seed", "4294967296"],
        "lr-nan": ["--lr", "nan"], "lr-inf": ["--lr", "inf"], "set-nan": ["--set", "weight_decay=.nan"],
        "experiment-empty": ["--experiment", ""],
        "no-train-images": [*TINY, "--set", "split_digits.test_fraction=1.0"],
        "folder-no-train-images": [*FOLDERS[:2], "--data-root", "imgs", "--set", "folder_classes.n_tasks=1", *TINY],
        "embed-dim-33": ["--set", "model_kwargs={patch_size: 8, depth: 2, embed_dim: 33, num_heads: 2}",
                         "--set", "image_size=16"],
        "patch-size-0": ["--set", "model_kwargs={patch_size: 0, depth: 2, embed_dim: 32, num_heads: 2}",
                         "--set", "image_size=16"],
        "file-store-folder": [*TINY, "--tracking-uri", "./mlruns"],
        "file-store-uri": [*TINY, "--tracking-uri", "file:./mlruns"],
        "impossible": [*TINY, "--tracking-uri", "sqlite:///afile/sub/mlflow.db"],
        "db-random": TINY, "db-half": TINY,
        "not-mlflow": [*TINY, "--tracking-uri", http_uri],
        "disjoint": ["--scenario", "folder_domains", "--data-root", "root", *TINY],
    }
    if mounts:
        one_line["readonly-cwd"] = TINY
        one_line["readonly-checkpoint-dir"] = [*TINY, "--set", f"checkpoint_dir={mounts['ro']}/ckpt"]
        one_line["immutable-db"] = TINY
    folders = {"folder-no-train-images": bad / "few", "disjoint": bad / "disjoint", "impossible": bad / "impossible",
               "readonly-cwd": mounts.get("ro")}
    waves1_bad = [_case(name, ["run", "--no-progress", *args], folders.get(name) or bad / name)
                  for name, args in one_line.items() if name != "db-half"]
    waves1_bad += [_case("compare-random", ["compare"], bad / "compare-random"),
                   _case("compare-plot-unwritable", ["compare", "--plot", "/proc/clframe-plot.png"], root / "race"),
                   _case("compare-plot-no-folder", ["compare", "--plot", "no/such/folder/p.png"], root / "race")]
    double = ("for d in imgs/*/; do for f in \"$d\"*.png; do cp \"$f\" \"${f%.png}-copy.png\"; done; done")
    size = "$(stat -c %s $(find lock -name last.pt))"
    plan = [{"stores": [str(root / name / "mlflow.db") for name in ("end", "tmp", "create", "lock", "data", "full")]},
            {"barrier": str(root / "race" / "go"), "cases": wave1}, {"cases": waves1_bad},
            {"sh": f"head -c $(( $(stat -c %s race/mlflow.db) / 2 )) race/mlflow.db > bad/db-half/mlflow.db",
             "cwd": str(root)},
            {"sh": double, "cwd": str(root / "data")}]
    wave2 = [
        _case("db-half", ["run", "--no-progress", *TINY], bad / "db-half"),
        _case("compare-half", ["compare"], bad / "db-half"),
        _case("end-resume", ["run", "--resume", f"{{last.pt:{root / 'end'}}}", "--no-progress"], root / "elsewhere"),
        _case("lock-second", ["run", "--resume", f"{{last.pt:{root / 'lock'}}}", "--no-progress"], root / "lock"),
        _case("tmp-next", ["run", *TWO_TASKS], root / "tmp"),
        _case("data-resume", ["run", "--resume", f"{{last.pt:{root / 'data'}}}", "--no-progress"], root / "data"),
    ]
    plan.append({"cases": wave2})
    if mounts:
        plan.append({"sh": f"mount -t tmpfs -o size=$(( {size} * 3 / 2 + 8192 )) tmpfs {mounts['full']}",
                     "cwd": str(root)})
    plan.append({"kill": "lock"})
    plan.append({"sh": "rm data/mlflow.db", "cwd": str(root)})
    wave3 = [
        _case("end-resume-again", ["run", "--resume", f"{{last.pt:{root / 'end'}}}", "--no-progress"], root / "end"),
        _case("lock-resume", ["run", "--resume", f"{{last.pt:{root / 'lock'}}}", "--no-progress"], root / "lock"),
        _case("data-store-gone", ["run", "--resume", f"{{last.pt:{root / 'data'}}}", "--no-progress"], root / "data"),
    ]
    if mounts:
        # five tasks: task 2's checkpoint is a full one (the last task's keeps no optimizer state)
        wave3.append(_case("disk-full", [*SIZED, "--set", "split_digits.n_tasks=5", "--set",
                                         f"checkpoint_dir={mounts['full']}"], root / "full"))
    plan.append({"cases": wave3})
    return plan


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs the whole plan once; yields (root, results by case name)."""
    root = tmp_path_factory.mktemp("races")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mounts, cleanup = {}, []
    if IS_ROOT and sys.platform.startswith("linux"):
        mounts = _mounts(root, cleanup)
    try:
        plan = build_plan(root, f"http://127.0.0.1:{server.server_address[1]}", mounts)
        (root / "plan.json").write_text(json.dumps(plan))
        env = dict(os.environ, **ENV, PYTHONPATH=str(TESTS))
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop(KILL, None)
        driven = subprocess.run([sys.executable, __file__, "plan.json", "results.json"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert driven.returncode == 0, driven.stderr[-3000:]
        yield root, mounts, json.loads((root / "results.json").read_text())
    finally:
        server.shutdown()
        for undo in reversed(cleanup):
            subprocess.run(undo, shell=True, check=False)


def _mounts(root: Path, cleanup: list[str]) -> dict[str, Path]:
    """A read-only bind mount, an immutable store and a folder for a small tmpfs (root only)."""
    source, readonly, full = root / "ro-source", root / "ro", root / "full-disk"
    for folder in (source, readonly, full, root / "bad" / "immutable-db"):
        folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(f"mount --bind {source} {readonly} && mount -o remount,bind,ro {readonly}", shell=True,
                          capture_output=True)
    if made.returncode != 0:
        return {}
    cleanup.append(f"umount {readonly}")
    db = root / "bad" / "immutable-db" / "mlflow.db"
    db.write_bytes(b"")
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        return {}
    cleanup.append(f"chattr -i {db}")
    cleanup.append(f"umount {full} 2>/dev/null")
    return {"ro": readonly, "full": full}


# ----- helpers -----
def one_error_line(result: dict) -> str:
    assert "Traceback" not in result["stderr"] + result["stdout"], result["stderr"][-3000:]
    errors = [line for line in result["stderr"].replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result["stderr"][-3000:]
    return errors[0]


def runs(folder: Path, db: str = "mlflow.db"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / db}")
    experiment = client.get_experiment_by_name("clframe")
    return client, (client.search_runs([experiment.experiment_id]) if experiment else [])


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.rglob("last.pt"))


# ----- High -----
def test_1_four_runs_started_together_in_a_new_folder_all_finish(world):
    root, _, results = world
    for seed in range(4):
        assert results[f"race-{seed}"]["code"] == 0, results[f"race-{seed}"]["stderr"][-3000:]
        assert "Creating initial MLflow database tables" not in results[f"race-{seed}"]["stderr"]
    _, found = runs(root / "race")
    assert len(found) == 4 and {r.info.status for r in found} == {"FINISHED"}
    assert {r.data.params["run.seed"] for r in found} == {"0", "1", "2", "3"}


def test_2_resume_of_a_complete_checkpoint_finishes_the_run_from_another_folder(world):
    root, _, results = world
    assert results["end"]["code"] == -signal.SIGKILL
    client, (run,) = runs(root / "end")
    resumed = results["end-resume"]
    assert resumed["code"] == 0, resumed["stderr"][-3000:]
    assert "had trained all 2 tasks when it stopped; finishing it" in resumed["stdout"]
    _, (run,) = runs(root / "end")  # item 10: the absolute store in the checkpoint, not ./mlflow.db there
    assert run.info.status == "FINISHED" and "wall_time_s" in run.data.metrics
    assert not (root / "elsewhere" / "mlflow.db").exists() and not (root / "elsewhere" / ".clframe").exists()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"acc_matrix.csv", "acc_matrix.png", "config.yaml"} <= artifacts and "checkpoints" not in artifacts
    (path,) = checkpoints(root / "end")
    saved = torch.load(path, weights_only=True)
    assert saved["tracking_uri"] == f"sqlite:///{root / 'end' / 'mlflow.db'}"
    assert saved["elapsed_s"] > 0 and run.data.metrics["wall_time_s"] >= saved["elapsed_s"]
    assert saved["optimizer_state"] is None  # issue 19.11: the finished run keeps trainable state only
    again = results["end-resume-again"]
    assert again["code"] == 1 and "already finished all its tasks; nothing to resume" in one_error_line(again)


def test_3_sixteen_bit_int_and_float_images_are_rescaled_not_saturated(tmp_path):
    from PIL import Image

    from clframe.scenarios.folders import read_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    cases = {"i16.png": Image.fromarray((ramp * 65535).astype(np.uint16)),
             "i32.tif": Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32)),
             "f01.tif": Image.fromarray(ramp.astype(np.float32)),
             "fwide.tif": Image.fromarray((ramp * 3000 - 7).astype(np.float32))}
    for name, image in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as check:
            assert check.mode in ("I;16", "I", "F"), (name, check.mode)
        pixels = read_image(tmp_path / name, 16)
        assert pixels.dtype == np.uint8 and pixels.min() <= 10 and pixels.max() >= 245, name  # the full range
        assert np.array_equal(pixels[0], pixels[1])
    dark = Image.fromarray(np.full((8, 8), 257, dtype=np.uint16))  # 16-bit: by the type's range, not stretched
    dark.save(tmp_path / "dark.png")
    assert read_image(tmp_path / "dark.png", 8).max() == 1
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(tmp_path / "nan.tif")
    from clframe.errors import ClframeError

    with pytest.raises(ClframeError, match=r"nan.tif \(PIL mode F\) holds NaN"):
        read_image(tmp_path / "nan.tif", 8)


# ----- Medium -----
def test_4_changed_data_is_refused_on_resume(world):
    root, _, results = world
    assert results["data"]["code"] == -signal.SIGKILL
    line = one_error_line(results["data-resume"])
    assert "the data of folder_classes changed since" in line
    assert "the number of images per task, the images themselves differ" in line
    assert "warning: folder_classes on a randomly initialised" in results["data"]["stderr"]  # issue 19.10
    (path,) = checkpoints(root / "data")  # the refused resume never reopened the killed run, still RUNNING:
    assert not (path.parent / ".lock").read_bytes().startswith(b"ended")  # its lock must not say it was closed


def test_4_fingerprint_sees_one_changed_pixel():
    from clframe.config import resolve_config
    from clframe.runner import build_stream, stream_signature
    from clframe.scenarios.split_digits import SplitDigitsConfig
    from clframe.strategies.linear import LinearConfig

    config = resolve_config({"scenario": "split_digits", "strategy": "linear"}, None, [], SplitDigitsConfig,
                            LinearConfig)
    stream = build_stream(config)
    before = stream_signature(stream, config)
    stream.experiences[3].train_images[0, 0, 0, 0] += 1
    after = stream_signature(stream, config)
    assert before["n_images"] == after["n_images"] and before["fingerprint"] != after["fingerprint"]


def test_5_a_second_process_cannot_drive_a_live_run_but_a_dead_ones_lock_is_taken_over(world):
    root, _, results = world
    line = one_error_line(results["lock-second"])
    assert "is being driven by process" in line and "wait for it to end, or stop it (kill " in line
    assert results["lock-second"]["stdout"] == ""
    resumed = results["lock-resume"]  # after the holder was killed with SIGKILL: its lock is stale
    assert resumed["code"] == 0, resumed["stderr"][-3000:]
    assert "resuming run" in resumed["stdout"] and "after task 1/2" in resumed["stdout"]
    _, (run,) = runs(root / "lock")
    assert run.info.status == "FINISHED"
    assert len([m for m in runs(root / "lock")[0].get_metric_history(run.info.run_id, "acc_avg")]) == 2


def test_5_run_lock_in_process(tmp_path):
    from clframe.errors import ClframeError
    from clframe.runfiles import RunLock

    first = RunLock(tmp_path).acquire("r1")
    with pytest.raises(ClframeError, match=f"run r1 is being driven by process {os.getpid()}"):
        RunLock(tmp_path).acquire("r1")
    first.release()
    RunLock(tmp_path).acquire("r1").release()


def test_5_blank_locks_are_not_abandoned_and_foreign_hosts_count_as_alive(tmp_path, monkeypatch):
    import socket

    from clframe import runfiles
    from clframe.runfiles import RunLock, abandoned_runs

    starting, dead, closed = (tmp_path / name for name in ("starting", "dead", "closed"))
    for folder in (starting, dead, closed):
        folder.mkdir()
    (starting / ".lock").write_bytes(b"")  # created by try_acquire, not yet locked nor written
    (dead / ".lock").write_text(f"4194305 0 {socket.gethostname()}\n")  # above any pid_max: no such process
    (closed / ".lock").write_bytes(runfiles.ENDED)
    found = [(run_id, lock) for run_id, lock in abandoned_runs(tmp_path)]
    assert [run_id for run_id, _ in found] == ["dead"]
    for _, lock in found:
        lock.release(ended=False)
    assert (starting / ".lock").read_bytes() == b""

    def no_flock(handle, operation):  # a network file system without flock: the pid in the file decides
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(runfiles.fcntl, "flock", no_flock)
    (dead / ".lock").write_text(f"{os.getpid()} 0 another-host-{socket.gethostname()}\n")
    assert not RunLock(dead).try_acquire()  # its pid cannot be checked from here: alive
    (dead / ".lock").write_text(f"4194305 0 {socket.gethostname()}\n")
    taken = RunLock(dead)
    assert taken.try_acquire()
    taken.release()


def _assert_refused_writing_nothing(result: dict, folder: Path, *expected: str) -> None:
    line = one_error_line(result)
    assert result["code"] == 1 and result["stdout"] == ""
    for text in expected:
        assert text in line, line
    assert not {"mlruns", ".clframe", "mlflow-fallback.db"} & {p.name for p in folder.iterdir()}


@pytest.mark.skipif(not IS_ROOT, reason="read-only mounts and chattr need root")
def test_7_unwritable_folders_and_store_are_refused_before_the_run_opens(world):
    root, mounts, results = world
    if not mounts:
        pytest.skip("mounts unavailable here")
    _assert_refused_writing_nothing(results["readonly-cwd"], mounts["ro"], "the folder of the MLflow store",
                                    "is not writable (Read-only file system")
    _assert_refused_writing_nothing(results["readonly-checkpoint-dir"], root / "bad" / "readonly-checkpoint-dir",
                                    "the checkpoint folder", "is not writable")
    _assert_refused_writing_nothing(results["immutable-db"], root / "bad" / "immutable-db",
                                    "the MLflow store", "mlflow.db is not writable (Operation not permitted)")


@pytest.mark.skipif(not IS_ROOT, reason="a small tmpfs needs root")
def test_7_a_disk_that_fills_mid_run_fails_the_run_in_one_line_keeping_the_last_checkpoint(world):
    root, mounts, results = world
    if not mounts:
        pytest.skip("mounts unavailable here")
    result = results["disk-full"]
    line = one_error_line(result)
    assert result["code"] == 1
    assert f"the disk is full writing {mounts['full']}" in line and "during task 2/5" in line
    assert "marked FAILED" in line and "free some space, then resume with: clframe run --resume" in line
    assert "the checkpoint after task 1/5 is kept at" in line
    (path,) = checkpoints(mounts["full"])
    assert torch.load(path, weights_only=True)["tasks_done"] == 1
    assert not list(path.parent.glob(".tmp-*"))
    _, (run,) = runs(root / "full")
    assert run.info.status == "FAILED" and "disk is full" in run.data.tags["clframe.error"]


def test_8_file_stores_are_refused_naming_sqlite(world):
    root, _, results = world
    for name in ("file-store-folder", "file-store-uri"):
        _assert_refused_writing_nothing(results[name], root / "bad" / name, "folder (file) stores are not supported",
                                        "use --tracking-uri sqlite:///mlruns.db")


def test_9_a_damaged_store_is_one_line_for_run_and_compare(world):
    root, _, results = world
    for name in ("db-random", "db-half", "compare-random", "compare-half"):
        line = one_error_line(results[name])
        assert "is damaged" in line and "mlflow.db" in line and "move it aside" in line, (name, line)
    assert "cut short" in one_error_line(results["db-half"])


# ----- Low -----
ONE_LINE = [
    ("seed-negative", "config key 'run.seed' must be >= 0; got -1"),
    ("seed-too-big", "config key 'run.seed' must be <= 4294967295; got 4294967296"),
    ("lr-nan", "config key 'run.lr' wants a finite number, got nan"),
    ("lr-inf", "config key 'run.lr' wants a finite number, got inf"),
    ("set-nan", "config key 'run.weight_decay' wants a finite number"),
    ("experiment-empty", "config key 'run.experiment' must not be empty"),
    ("no-train-images", "scenario split_digits: task 1/5 has no training images; lower split_digits.test_fraction"),
    ("folder-no-train-images", "scenario folder_classes: task 1/1 has no training images"),
    ("embed-dim-33", "cannot be built with model_kwargs={'patch_size': 8, 'depth': 2, 'embed_dim': 33"),
    ("patch-size-0", "(ZeroDivisionError: integer division or modulo by zero); fix run.model_kwargs"),
    ("impossible", "cannot be created"),
    ("not-mlflow", "answers /health but not as an MLflow tracking server"),
    ("disjoint", "folder_domains: domain photo shares no class with the other domains"),
]


@pytest.mark.parametrize("name, expected", ONE_LINE, ids=[name for name, _ in ONE_LINE])
def test_low_bad_input_is_one_line_before_any_run_exists(world, name, expected):
    root, _, results = world
    folder = {"folder-no-train-images": "few", "disjoint": "disjoint"}.get(name, name)
    _assert_refused_writing_nothing(results[name], root / "bad" / folder, expected)
    assert not (root / "bad" / folder / "mlflow.db").exists()


def test_low_compare_plot_into_an_unwritable_path_is_one_line(world):
    _, _, results = world
    assert "the folder of --plot /proc is not writable" in one_error_line(results["compare-plot-unwritable"])
    assert "no/such/folder does not exist" in one_error_line(results["compare-plot-no-folder"])


def test_low_sigterm_while_the_run_is_created_marks_it_killed(world):
    root, _, results = world
    result = results["create"]
    assert result["code"] == 128 + signal.SIGTERM
    line = one_error_line(result)
    assert "interrupted by SIGTERM as its MLflow run was being created" in line and "marked KILLED" in line
    _, (run,) = runs(root / "create")
    assert run.info.status == "KILLED"


def test_low_orphan_temporary_checkpoint_is_removed_by_the_next_run(world):
    root, _, results = world
    assert results["tmp"]["code"] == -signal.SIGKILL
    assert results["tmp-next"]["code"] == 0, results["tmp-next"]["stderr"][-3000:]
    assert not list((root / "tmp").rglob(".tmp-*"))
    assert len(checkpoints(root / "tmp")) == 1  # the killed run wrote none; the next one its own
    _, found = runs(root / "tmp")  # and the killed run is not left RUNNING with no process behind it
    killed = next(r for r in found if r.info.run_id not in results["tmp-next"]["stdout"])
    assert {r.info.status for r in found} == {"FINISHED", "KILLED"} and killed.info.status == "KILLED"
    assert "the process driving it had died" in killed.data.tags["clframe.closed_by"]


def test_low_resume_after_the_store_was_deleted_is_one_line_and_makes_no_new_store(world):
    root, _, results = world
    line = one_error_line(results["data-store-gone"])
    assert "that holds this run is gone; put it back" in line
    assert not (root / "data" / "mlflow.db").exists()


def test_19_10_header_line_and_stream_order_params(world):
    root, _, results = world
    header = results["race-0"]["stdout"].splitlines()[0]
    assert header.startswith("split_digits (class-IL, 2 tasks, class order ")
    assert "| strategy linear | model vit_tiny_patch16_224 (32,170 parameters, 330 trainable) | device cpu | seed 0" \
        in header
    _, found = runs(root / "race")
    params = next(r for r in found if r.data.params["run.seed"] == "0").data.params
    assert params["stream.class_order"] == header.split("class order ")[1].split(")")[0]
    assert len(params["stream.fingerprint"]) == 32


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])
