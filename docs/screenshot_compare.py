"""Make the README's picture of the MLflow UI: docs/ui_charts.png.

    python docs/screenshot_compare.py [--store sqlite:///PATH/mlflow.db] [--out-dir docs]

Without ``--store`` it first runs the README's sweep (3 strategies x 3 seeds on the offline
Split Digits stream, ``--set epochs=1`` to keep it to a few minutes on a CPU) into a temporary
sqlite store. It serves the store as ``clframe ui`` does (one lean ``mlflow server``), opens the
URL ``clframe ui`` prints (the experiment's runs, in the UI's "Model training" view) in chart mode in
headless Chromium, and saves ``ui_charts.png``: with the sweep's parent row collapsed, its
per-strategy sections plot the mean (and std) over seeds of acc_avg, acc_seen, acc_inc_avg,
forgetting and bwt against the step = task index. (MLflow 3's run table shows no metric columns
until they are picked under "Columns", so a picture of the table would show names and dates only.)

Where no Chromium is installed it says so and exits 0 (``apt-get install chromium`` on Debian).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
STRATEGIES = ("linear", "bitfit", "finetune")
SEEDS = "0,1,2"


def shoot(browser: str, url: str, out: Path, size: str, profile: Path) -> None:
    out.unlink(missing_ok=True)
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={size}",
               "--virtual-time-budget=45000", url]
    print("opening", url, flush=True)
    subprocess.run(command, check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not out.is_file():
        raise SystemExit(f"Chromium wrote no screenshot to {out}")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent))
    parser.add_argument("--window-size", default="1500,950", help="WIDTH,HEIGHT of the browser window")
    parser.add_argument("--store", help="an existing sqlite:///... store holding a clframe sweep (skips the sweep)")
    parser.add_argument("--experiment", default="clframe")
    args = parser.parse_args()
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        print("skipped: no Chromium found (apt-get install chromium, or put chrome on PATH)")
        return
    from clframe.mlflow_server import local_mlflow_server
    from clframe.ui import find_experiment, runs_view_url

    with tempfile.TemporaryDirectory(prefix="clframe-shot-") as tmp:
        tmp = Path(tmp)
        store = args.store or f"sqlite:///{tmp}/mlflow.db"
        if not args.store:
            sweep = [sys.executable, "-m", "clframe", "run", *[a for s in STRATEGIES for a in ("--strategy", s)],
                     "--seeds", SEEDS, "--set", "epochs=1", "--no-progress", "--tracking-uri", store,
                     "--run-name", "paper-table", "--set", f"checkpoint_dir={tmp}/ckpt"]
            print("running", " ".join(sweep[2:]), flush=True)
            subprocess.run(sweep, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        experiment_id = find_experiment(store, args.experiment)
        with local_mlflow_server(store) as server:  # as clframe ui serves it
            runs = runs_view_url(server.url, experiment_id)
            out_dir = Path(args.out_dir).resolve()
            shoot(browser, runs + "&compareRunsMode=CHART", out_dir / "ui_charts.png", args.window_size,
                  tmp / "chromium")


if __name__ == "__main__":
    main()
