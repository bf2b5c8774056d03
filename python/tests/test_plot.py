"""scripts/plot.py: the roofline of a bench CSV and the expert-load chart of a
model, checked as files a user opens (valid SVG holding what it claims)."""

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("matplotlib")


def svg_text(path):
    root = ET.parse(path).getroot()  # well-formed SVG
    assert root.tag.endswith("svg")
    # matplotlib draws text as glyph paths and keeps each string beside them
    # in a comment: search the file
    return path.read_text()


def run_plot(repo, *args):
    r = subprocess.run([sys.executable, str(repo / "scripts" / "plot.py"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_roofline(repo, tmp_path):
    # two runs' worth of rows from one bench: peaks 200 GFLOP/s and 25 GB/s
    rows = [("qwen3", 1, "f32", 8.0, 20.0, 4.0, 80.0, 9.0),
            ("qwen3", 4096, "bf16", 900.0, 180.0, 0.5, 90.0, 1100.0),
            ("mixtral", 16, "f32", 40.0, 60.0, 5.0, 30.0, 50.0)]
    csv = tmp_path / "b.csv"
    with open(csv, "w") as f:
        f.write("shape,tokens,weights,routing,ms,gflops,gbps,pct_peak_flops,pct_peak_bw,"
                "baseline_ms,speedup\n")
        for s, t, w, ms, gf, gb, pb, base in rows:
            f.write("%s,%d,%s,uniform,%g,%g,%g,%g,%g,%g,%g\n"
                    % (s, t, w, ms, gf, gb, 100 * gf / 200.0, pb, base, base / ms))
    out = tmp_path / "roof.svg"
    msg = run_plot(repo, "roofline", str(csv), "-o", str(out))
    assert "(3 points)" in msg
    text = svg_text(out)
    # the roof's label carries the peaks recovered from the percentages
    assert "FMA 200 GFLOP/s" in text
    bad = tmp_path / "empty.csv"
    bad.write_text("shape,tokens\n")
    r = subprocess.run([sys.executable, str(repo / "scripts" / "plot.py"), "roofline",
                        str(bad), "-o", str(tmp_path / "x.svg")], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "no measured rows" in r.stderr


def test_roofline_json(repo, tmp_path):
    # the document of `moegen bench --json`: the peaks are the machine's; a
    # row measured on one side only (null rates) is not a point
    import json
    doc = {"machine": {"cpu": "x", "threads": 1, "peak_gflops": 300.0, "dram_gbps": 40.0},
           "probes": [],
           "rows": [{"shape": "qwen3", "tokens": 16, "weights": "f32", "routing": "uniform",
                     "ms": 2.0, "gflops": 30.0, "gbps": 20.0, "baseline_ms": 3.0},
                    {"shape": "ec", "tokens": 256, "weights": "bf16", "routing": "mode",
                     "ms": 1.0, "gflops": 90.0, "gbps": 10.0, "baseline_ms": None},
                    {"shape": "qwen3", "tokens": 1, "weights": "f32", "routing": "zipf",
                     "ms": None, "gflops": None, "gbps": None, "baseline_ms": 1.0}]}
    js = tmp_path / "b.json"
    js.write_text(json.dumps(doc))
    out = tmp_path / "roof.svg"
    msg = run_plot(repo, "roofline", str(js), "-o", str(out))
    assert "(2 points)" in msg
    assert "FMA 300 GFLOP/s, DRAM 40.0 GB/s" in svg_text(out)


def test_expert_load(repo, tmp_path, moegen_cmd):
    so = tmp_path / "m.so"
    subprocess.run([moegen_cmd, str(repo / "specs" / "mixtral-mini.yaml"), "-o", str(so)],
                   check=True)
    out = tmp_path / "load.svg"
    msg = run_plot(repo, "load", str(so), "--tokens", "300", "-o", str(out))
    # every token's k = 2 slots are counted once
    assert "(8 experts, 600 routed slots)" in msg
    text = svg_text(out)
    assert "mixtral-mini" in text and "uniform share 75.0" in text
