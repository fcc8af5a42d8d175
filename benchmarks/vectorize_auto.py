"""engine.vectorize off / on / auto on the same FedAvg-EE digits runs: steady round time and
what auto chose, per model width.

Run from outside the repository (or anywhere the package is installed):

    python benchmarks/vectorize_auto.py                 # widths 8 and 32, 2 alternated repeats
    python benchmarks/vectorize_auto.py --widths 8 --repeats 1 --clients 6 --rounds 7
    python benchmarks/vectorize_auto.py --dataset fashion_mnist --max-train 20000 --clients 20 \
        --epochs 1 --widths 16 --repeats 1   # the Flower comparison's Fashion-MNIST work

Every client trains every round (2 local epochs unless told); the steady figure sums rounds 4 to T-2,
after auto's probing (its first three cohorts each way) and before the last round's
evaluation. Modes are alternated (off, auto, on, then on, auto, off) so that a drifting
machine load does not favour one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from cafe_ray.bench import overhead
from cafe_ray.runs import rundir
from cafe_ray.sim.engine import run_simulation


def measure(width: int, mode: str, args: argparse.Namespace, out: str) -> tuple[float, float, list]:
    """(end-to-end s, steady rounds s, auto's notes) of one run."""
    cfg = overhead.workload(args.dataset, args.clients, args.rounds, args.epochs, None, width, args.max_train, out,
                            vectorize=mode)
    executor = args.executor
    cfg = cfg.model_copy(update={"executor": executor}) if executor != cfg.executor else cfg
    t = time.perf_counter()
    run_dir, summary = run_simulation(cfg, show_progress=False)
    e2e = time.perf_counter() - t
    recs = rundir.read_jsonl(run_dir / "metrics.jsonl")
    steady = sum(r["wall_s"] for r in recs[4:-1])
    return e2e, steady, sorted({n for notes in summary["vectorize"].values() for n in notes})


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits", help="a dataset cafe-ray loads (digits, fashion_mnist, ...)")
    ap.add_argument("--max-train", type=int, default=None, help="cap on the training samples")
    ap.add_argument("--epochs", type=int, default=2, help="local epochs")
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--executor", choices=["ray", "sequential"], default="ray")
    args = ap.parse_args(argv)
    if args.rounds < 6:
        ap.error("--rounds must be at least 6: auto probes through round 2 and rounds 4..T-2 are timed")
    out = tempfile.mkdtemp(prefix="vectorize-auto-")
    rows: dict[tuple[int, str], list[tuple[float, float, list]]] = {}
    for rep in range(args.repeats):
        for width in args.widths:
            modes = ("off", "auto", "on") if rep % 2 == 0 else ("on", "auto", "off")
            for mode in modes:
                res = measure(width, mode, args, out)
                rows.setdefault((width, mode), []).append(res)
                print(f"w{width} {mode:4s} e2e {res[0]:6.2f} s  steady rounds {res[1]:5.2f} s  {res[2]}", flush=True)
    print(f"\nload {' '.join(f'{x:.1f}' for x in os.getloadavg())}; steady rounds min / median, vs off")
    table = []
    for (width, mode), res in sorted(rows.items()):
        steady = [r[1] for r in res]
        off = [r[1] for r in rows[(width, "off")]]
        row = {"width": width, "mode": mode, "steady_min": min(steady), "steady_median": statistics.median(steady),
               "vs_off_median": statistics.median(off) / statistics.median(steady),
               "notes": sorted({n for r in res for n in r[2]})}
        table.append(row)
        print(f"w{width:<3} {mode:4s} {row['steady_min']:.2f} / {row['steady_median']:.2f} s  "
              f"{row['vs_off_median']:.2f}x  {', '.join(row['notes']) or '-'}")
    return table


if __name__ == "__main__":
    main()
