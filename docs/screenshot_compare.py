"""Make docs/compare.png: the MLflow UI's compare page for three clframe runs of one sweep.

    python docs/screenshot_compare.py [--out docs/compare.png]

It runs a short sweep of three strategies on the offline Split Digits stream (tiny ViT, CPU,
about a minute) into a temporary sqlite store, starts ``mlflow server`` on it at 127.0.0.1, opens
the compare page of the three runs in headless Chromium and saves the screenshot. Where no
Chromium is installed it says so and exits 0 (``apt-get install chromium`` on Debian).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
STRATEGIES = ("linear", "bitfit", "finetune")
TINY = ["--set", "model_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, weight_init: moco}",
        "--set", "image_size=16", "--set", "epochs=1", "--no-progress"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(store: str, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return server
        except OSError:
            time.sleep(0.3)
    stop(server)
    raise SystemExit(f"mlflow server did not start; its log: {log}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("compare.png")))
    parser.add_argument("--window-size", default="1400,900", help="WIDTH,HEIGHT of the browser window")
    parser.add_argument("--store", help="an existing sqlite:///... store with a clframe sweep (skips the sweep)")
    args = parser.parse_args()
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        print("skipped: no Chromium found (apt-get install chromium, or put chrome on PATH)")
        return
    with tempfile.TemporaryDirectory(prefix="clframe-shot-") as tmp:
        tmp = Path(tmp)
        store = args.store or f"sqlite:///{tmp}/mlflow.db"
        sweep = [sys.executable, "-m", "clframe", "run", *[a for s in STRATEGIES for a in ("--strategy", s)], *TINY,
                 "--tracking-uri", store, "--run-name", "digits-strategies", "--set", f"checkpoint_dir={tmp}/ckpt"]
        print("running a sweep of", ", ".join(STRATEGIES), "...", flush=True)
        if not args.store:
            subprocess.run(sweep, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("clframe")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''",
                                  order_by=["metrics.acc_avg DESC"])
        run_ids = [run.info.run_id for run in runs if "acc_avg" in run.data.metrics][:3]
        port = free_port()
        server = start_server(store, port, tmp / "server.log")
        try:
            query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment.experiment_id])})
            url = f"http://127.0.0.1:{port}/#/compare-runs?{query}"
            out = Path(args.out).resolve()
            out.unlink(missing_ok=True)
            command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                       "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                       f"--user-data-dir={tmp / 'chromium'}", f"--screenshot={out}", f"--window-size={args.window_size}",
                       "--virtual-time-budget=30000", url]
            print("opening", url, flush=True)
            subprocess.run(command, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            stop(server)
    if not out.is_file():
        raise SystemExit(f"Chromium wrote no screenshot to {out}")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
