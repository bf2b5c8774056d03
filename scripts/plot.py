#!/usr/bin/env python3
"""Pictures of moegen's measurements (matplotlib from PyPI).

  plot.py roofline BENCH.csv|BENCH.json [-o roofline.svg]
      every point of `moegen bench --csv` or `--json` (the generated layer, and the BLAS
      baseline at the same arithmetic intensity) against the peaks the bench
      measured in the same run: the f32 FMA roof and the DRAM slope.
  plot.py load MODEL.so [--weights F.safetensors | --seed S] [--tokens N]
          [--layer L] [--input-seed S] [-o load.svg]
      tokens per expert of one forward (the routing statistics moe_forward
      returns), with the uniform share and the importance cv^2.

The output format follows the file name (.svg, .png, .pdf)."""

import argparse
import csv
import io
import json
import math
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_bench(path):
    """The measured rows of `moegen bench --csv` or `--json`, each with the run's
    peaks (peak_f GFLOP/s, peak_b GB/s)."""
    with open(path, newline="") as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        return read_bench_json(path, text)
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        try:
            ms, gf, gb = float(r["ms"]), float(r["gflops"]), float(r["gbps"])
            pf, pb = float(r["pct_peak_flops"]), float(r["pct_peak_bw"])
        except (KeyError, ValueError):
            continue  # probes-only or baseline-only rows
        if gf <= 0 or gb <= 0 or pf <= 0 or pb <= 0:
            continue
        rows.append(dict(r, ms=ms, gflops=gf, gbps=gb,
                         peak_f=gf / (pf / 100.0), peak_b=gb / (pb / 100.0),
                         base_ms=float(r.get("baseline_ms") or "nan")))
    if not rows:
        raise SystemExit("plot.py: %s has no measured rows (shape,tokens,...,gflops,gbps,...)"
                         % path)
    return rows


def read_bench_json(path, text):
    """`moegen bench --json`: the peaks are the machine's, the rows carry null
    where a side was not measured."""
    try:
        doc = json.loads(text)
        peak_f = float(doc["machine"]["peak_gflops"])
        peak_b = float(doc["machine"]["dram_gbps"])
        raw = doc["rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit("plot.py: %s is not a moegen bench JSON document (%s)" % (path, e))
    rows = []
    for r in raw:
        ms, gf, gb = r.get("ms"), r.get("gflops"), r.get("gbps")
        if not all(isinstance(v, (int, float)) and v > 0 for v in (ms, gf, gb)):
            continue
        base = r.get("baseline_ms")
        rows.append(dict(shape=r["shape"], tokens=str(r["tokens"]), weights=r["weights"],
                         routing=r["routing"], ms=ms, gflops=gf, gbps=gb,
                         peak_f=peak_f, peak_b=peak_b,
                         base_ms=float(base) if isinstance(base, (int, float)) else math.nan))
    if not rows:
        raise SystemExit("plot.py: %s has no measured rows" % path)
    return rows


def roofline(args):
    rows = read_bench(args.csv)
    # the bench's peaks: every row of one run carries the same two
    peak_f = max(r["peak_f"] for r in rows)
    peak_b = max(r["peak_b"] for r in rows)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = [r["gflops"] / r["gbps"] for r in rows]
    lo, hi = min(ai) / 4, max(ai) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak_f, peak_b * x) for x in xs], "k-", lw=1.5,
            label="roof: FMA %.0f GFLOP/s, DRAM %.1f GB/s" % (peak_f, peak_b))
    markers = {"f32": "o", "bf16": "s"}
    shapes = sorted({r["shape"] for r in rows})
    cmap = plt.get_cmap("tab20")
    colors = {s: cmap(2 * i % 20 + (2 * i // 20) % 2) for i, s in enumerate(shapes)}
    for r, x in zip(rows, ai):
        m = markers.get(r["weights"], "^")
        ax.plot([x], [r["gflops"]], m, color=colors[r["shape"]], ms=7)
        ax.annotate("T=%s" % r["tokens"], (x, r["gflops"]), textcoords="offset points",
                    xytext=(5, 3), fontsize=7)
        if math.isfinite(r["base_ms"]) and r["base_ms"] > 0:
            ax.plot([x], [r["gflops"] * r["ms"] / r["base_ms"]], m, mfc="none",
                    color=colors[r["shape"]], ms=7)
    for s in shapes:
        ax.plot([], [], "o", color=colors[s], label=s)
    for w, m in markers.items():
        if any(r["weights"] == w for r in rows):
            ax.plot([], [], m, color="k", label="%s weights" % w)
    ax.plot([], [], "o", mfc="none", color="k", label="BLAS baseline (hollow)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop per byte of weights read)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("moegen bench: %s" % os.path.basename(args.csv))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out)
    print("wrote %s (%d points)" % (args.out, len(rows)))


def load(args):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
    import numpy as np
    import moegen

    if args.weights:
        m = moegen.load(args.model, weights=args.weights)
    else:
        m = moegen.load(args.model, seed=args.seed)
    info = m.info
    x = np.random.default_rng(args.input_seed).standard_normal(
        (args.tokens, info.hidden)).astype(np.float32)
    _, r = m.forward(x, layer=args.layer, routing=True)
    counts = np.asarray(r.counts, dtype=np.int64)
    E = len(counts)
    share = counts.sum() / E
    fig, ax = plt.subplots(figsize=(max(6, min(16, E / 8)), 4.5))
    ax.bar(range(E), counts, width=1.0 if E > 64 else 0.8, color="C0")
    ax.axhline(share, color="k", lw=1, ls="--", label="uniform share %.1f" % share)
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens routed")
    ax.set_title("%s, layer %s, %d tokens\nimportance cv$^2$ %.4f, busiest expert %.2f x the mean"
                 % (info.name, args.layer if args.layer is not None else info.moe_layers[0],
                    args.tokens, r.importance_cv2, counts.max() / share if share else 0),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    m.close()
    print("wrote %s (%d experts, %d routed slots)" % (args.out, E, int(counts.sum())))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("roofline", help="bench CSV or JSON -> roofline")
    a.add_argument("csv")
    a.add_argument("-o", "--out", default="roofline.svg")
    a.set_defaults(fn=roofline)
    b = sub.add_parser("load", help="model.so -> tokens per expert")
    b.add_argument("model")
    b.add_argument("--weights", nargs="+")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--tokens", type=int, default=4096)
    b.add_argument("--layer", type=int)
    b.add_argument("--input-seed", type=int, default=0)
    b.add_argument("-o", "--out", default="load.svg")
    b.set_defaults(fn=load)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
