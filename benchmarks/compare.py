"""Wall time of a comparison inline vs on local worker processes, and the share of it spent training.

A fixed sub-grid of the claims preset (6 nano models x 2 seeds, 0.1 epoch of Fashion-MNIST with the preset's
recipe) is run with ``visionmix compare`` as

- ``inline``: one run after another in one process, ``--threads-per-run 2``;
- ``local``: ``--launcher local --jobs 2 --threads-per-run 1``, two one-thread runs side by side;

alternately, ``--repeats`` times each, every time into a fresh directory. For each we report the wall time of the
whole command (start-up, training, benchmarks, report), the training share (the runs' training time over their wall
time, from ``results.json``'s ``meta.time``) and the mean top-1, and the ratio inline / local. ``--quick``: 2 models x
1 seed on 640 digits images, one repeat, to check the script (seconds, not a measurement). ``--claims DIR``: instead,
the whole ``--preset claims`` once with the local layout into ``DIR`` (kept, to copy its report to
docs/results/claims), with its wall time, training share, where the rest went and the verdicts.

    flock /work/coord/bench.lock .venv/bin/python benchmarks/compare.py --quick
    flock /work/coord/bench.lock .venv/bin/python benchmarks/compare.py --out runs/bench-compare.json
    flock /work/coord/bench.lock .venv/bin/python benchmarks/compare.py --claims runs/claims --out runs/claims.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("resnet_nano", "seresnet_nano", "spach_ms_nano_conv", "uniformer_nano", "mixer_nano", "s2mlpv2_nano")
LAYOUTS = {"inline": ["--launcher", "inline", "--threads-per-run", "2"],
           "local": ["--launcher", "local", "--jobs", "2", "--threads-per-run", "1"]}


def grid(quick: bool) -> list[str]:
    """The ``visionmix compare`` options of the measured grid (the claims preset's recipe, 0.1 epoch)."""
    if quick:
        return ["--models", ",".join(MODELS[:2]), "--seeds", "1", "--data", "digits", "--epochs", "1",
                "--batch-size", "64", "--max-train-samples", "640", "--max-eval-samples", "200", "--bench-repeats",
                "2"]
    return ["--preset", "claims", "--models", ",".join(MODELS), "--seeds", "2", "--epochs", "0.1"]


def claims(out: Path) -> dict:
    """``--preset claims`` end to end with the local layout into ``out``: wall time, time accounting, verdicts."""
    record = run_once("local", ["--preset", "claims"], out)
    report = json.loads((out / "results.json").read_text())
    record["verdicts"] = {f"{c['model_a']} vs {c['model_b']}": c["verdict"] for c in report["claims"]}
    return record


def run_once(layout: str, options: list[str], out: Path) -> dict:
    """One ``visionmix compare`` into ``out``: its wall time and what its results.json says."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "visionmix", "compare", *options, *LAYOUTS[layout], "--no-progress",
                             "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{layout} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads((out / "results.json").read_text())
    top1 = [m["top1"] for m in report["models"] if m["top1"] is not None]
    timing = report["meta"]["time"]
    return {"layout": layout, "wall_s": round(wall, 2), "training_share": timing["training_share"],
            "runs": timing["runs"], "bench_s": round(sum(timing["bench_s"].values()), 2),
            "mean_top1": round(statistics.fmean(top1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny grid on digits, one repeat (checks the script)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each layout (alternating)")
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON here")
    parser.add_argument("--claims", type=Path, metavar="DIR", help="run --preset claims once (local layout) into DIR")
    args = parser.parse_args()
    if args.claims:
        record = claims(args.claims)
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in record["runs"].items())
        print(f"--preset claims, local: {record['wall_s']:.1f} s wall ({record['wall_s'] / 60:.1f} min), training "
              f"share {record['training_share']:.1%}, benchmarks {record['bench_s']:.1f} s, mean top-1 "
              f"{record['mean_top1']:.2f}%\nruns: {parts}")
        for pair, verdict in record["verdicts"].items():
            print(f"  {pair}: {verdict}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"cores": os.cpu_count(), **record}, indent=2) + "\n")
        return
    repeats = 1 if args.quick else args.repeats
    options = grid(args.quick)
    measured = []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        for repeat in range(repeats):
            for layout in LAYOUTS:
                record = run_once(layout, options, Path(tmp) / f"{layout}{repeat}")
                measured.append(record)
                print(f"{layout:6s} #{repeat + 1}: {record['wall_s']:8.1f} s wall, training share "
                      f"{record['training_share']:.1%}, benchmarks {record['bench_s']:.1f} s, mean top-1 "
                      f"{record['mean_top1']:.2f}%", flush=True)
    walls = {layout: statistics.median(r["wall_s"] for r in measured if r["layout"] == layout) for layout in LAYOUTS}
    print(f"median wall: inline {walls['inline']:.1f} s, local {walls['local']:.1f} s: local is "
          f"{walls['inline'] / walls['local']:.2f}x as fast")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"grid": options, "layouts": LAYOUTS, "cores": os.cpu_count(),
                                        "runs": measured, "median_wall_s": walls}, indent=2) + "\n")


if __name__ == "__main__":
    main()
