#!/usr/bin/env python3
"""The tables of docs/longdoc.md from the runs of scripts/longdoc-table.sh.

Reads runs/longdoc/<dataset>-<config>-s<seed>/result.json and the time-stamped logs beside
them, and prints two Markdown tables: measured epoch times per config (training passes only;
with --pauses, the time the run was stopped with SIGSTOP is subtracted from each epoch), and
test accuracy / macro-F1 per config (mean ± sd over the finished seeds).

    python3 scripts/longdoc-report.py [--runs runs/longdoc] [--pauses FILE]

FILE (default runs/longdoc/pauses.tsv) holds one stop per line: start and end as UTC
`%Y-%m-%dT%H:%M:%SZ`, tab-separated.
"""
import argparse
import datetime as dt
import glob
import json
import os
import re
import statistics

CONFIGS = [
    ("truncated-512", "(a) pretrained, truncated to 512"),
    ("longformer-4096", "(b) converted, Longformer-4096 (window 256, CLS global)"),
    ("performer-4096", "(b') converted, Performer-4096 (256 features)"),
    ("scratch-longformer-4096", "(c) Longformer-4096 from scratch"),
]


def stamp(s):
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ")


def seconds(text):
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+)s", text)
    h, mi, s = (int(x) if x else 0 for x in m.groups())
    return 3600 * h + 60 * mi + s


def epochs(log, pauses):
    """{epoch: (running seconds, real tokens/s, padded tokens/s)} of the finished train splits."""
    out = {}
    line_re = re.compile(
        r"(\S+) \[train\] epoch (\d+)/\d+ .*\(100%\).*?([\d.]+) tokens/s \(([\d.]+) padded\)"
        r"\s+elapsed (\S+)"
    )
    for line in open(log):
        m = line_re.match(line)
        if not m:
            continue
        end, elapsed = stamp(m.group(1)), seconds(m.group(5))
        start = end - dt.timedelta(seconds=elapsed)
        stopped = sum(
            max(0.0, (min(end, b) - max(start, a)).total_seconds()) for a, b in pauses
        )
        running = elapsed - stopped
        # tokens/s in the line are over the elapsed time, stops included: rescale.
        scale = elapsed / running if running > 0 else 1.0
        out[int(m.group(2))] = (running, float(m.group(3)) * scale, float(m.group(4)) * scale)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/longdoc")
    ap.add_argument("--pauses", default=None, help="default: <runs>/pauses.tsv")
    a = ap.parse_args()
    pauses = []
    a.pauses = a.pauses or os.path.join(a.runs, "pauses.tsv")
    if os.path.exists(a.pauses):
        for line in open(a.pauses):
            parts = line.rstrip("\n").split("\t")
            pauses.append((stamp(parts[0]), stamp(parts[1])))
    for data, title in [("hp", "Hyperpartisan"), ("imdb", "IMDB")]:
        print(f"### {title}: epoch times\n")
        print("| config | epochs measured | seconds per epoch | real tokens/s | padded tokens/s |")
        print("|---|---:|---:|---:|---:|")
        for config, name in CONFIGS:
            per = []
            for log in sorted(glob.glob(f"{a.runs}/{data}-{config}-s*.log")):
                per += list(epochs(log, pauses).values())
            if not per:
                continue
            secs = statistics.median(p[0] for p in per)
            real = statistics.median(p[1] for p in per)
            padded = statistics.median(p[2] for p in per)
            print(f"| {name} | {len(per)} | {secs:.0f} | {real:.0f} | {padded:.0f} |")
        print(f"\n### {title}: test scores\n")
        print("| config | seeds finished | accuracy | macro-F1 |")
        print("|---|---|---:|---:|")
        for config, name in CONFIGS:
            results = []
            for path in sorted(glob.glob(f"{a.runs}/{data}-{config}-s*/result.json")):
                r = json.load(open(path))
                seed = re.search(r"-s(\d+)/result.json$", path).group(1)
                results.append((seed, r["test"]["accuracy"], r["test"]["macro_f1"]))
            if not results:
                print(f"| {name} | none yet | – | – |")
                continue
            seeds = ", ".join(s for s, _, _ in results)

            def fmt(values):
                mean = 100 * statistics.mean(values)
                if len(values) < 2:
                    return f"{mean:.1f}"
                return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"

            acc = fmt([x for _, x, _ in results])
            f1 = fmt([x for _, _, x in results])
            print(f"| {name} | {seeds} | {acc} | {f1} |")
        print()


if __name__ == "__main__":
    main()
