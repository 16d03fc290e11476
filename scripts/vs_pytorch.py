#!/usr/bin/env python3
"""efformer against PyTorch on this machine, in one sitting, both at the same thread count.

Runs PyTorch's reference scripts (`../shared/notes/perf/attn_bench.py --mode core` and
`train_step_bench.py`) and efformer's `bench` and `bench-train` on the same algorithms and
shapes, one after the other, writes every record to `docs/vs-pytorch/*.json` and regenerates
the comparison tables of `docs/benchmarks.md` (between the `vs-pytorch` markers).

    python3 scripts/vs_pytorch.py --python /path/to/venv/bin/python   # measure, then render
    python3 scripts/vs_pytorch.py --render-only                       # tables from the JSON

Needs a release build of `efformer` (`cargo build --release -p train`) and a Python with
torch and psutil for the PyTorch side. Keep the machine otherwise idle while it runs
(about 15 minutes on 2 cores).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (row label, PyTorch variant, efformer variant, efformer mode)
ATTENTION = [
    ("exact: SDPA vs `full`", "sdpa", "full", "bidirectional"),
    ("exact causal: SDPA causal vs `full` causal", "sdpa_causal", "full", "causal"),
    ("exact, unfused: naive vs `memory-efficient`", "naive", "memory-efficient", "bidirectional"),
    ("linear attention (elu + 1)", "linear", "linear-transformer", "bidirectional"),
    ("causal linear, chunks of 64", "linear_causal_chunked", "linear-transformer", "causal"),
    ("Performer, m = 256", "performer", "performer", "bidirectional"),
    ("Linformer, k = 256", "linformer", "linformer", "bidirectional"),
    ("sliding window (PyTorch 512 keys per query; Longformer 513, in blocks computing 640)", "sliding_window",
     "longformer", "bidirectional"),
]
# (row label, PyTorch attention, efformer attention)
TRAINING = [
    ("exact: SDPA vs `full`", "sdpa", "full"),
    ("linear attention", "linear", "linear-transformer"),
]
BEGIN, END = "<!-- vs-pytorch:begin", "<!-- vs-pytorch:end -->"


def run(cmd, cwd=None, env=None):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def machine(python):
    cpu = "unknown CPU"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    torch = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "simd": simd,
        "cores": os.cpu_count(),
        "torch": torch,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def measure(args, out):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    ns = args.lengths
    torch_variants = sorted({row[1] for row in ATTENTION})
    run([args.python, "attn_bench.py", "--mode", "core", "--threads", str(args.threads),
         "--ns", ns, "--variants", ",".join(torch_variants), "--lucid", "",
         "--reps", str(args.reps), "--out", os.path.join(out, "torch_attention.json")],
        cwd=args.perf_dir, env=env)
    for mode in ("bidirectional", "causal"):
        variants = sorted({row[2] for row in ATTENTION if row[3] == mode})
        run([args.efformer, "bench", "--mode", mode, "--variants", ",".join(variants),
             "--lengths", ns, "--backward", "--reps", str(args.reps),
             "--json", os.path.join(out, f"efformer_{mode}.json")], env=env)
    if not args.skip_training:
        run([args.python, "train_step_bench.py", "--ns", ns, "--threads", str(args.threads),
             "--attns", ",".join(row[1] for row in TRAINING), "--steps", str(args.steps),
             "--out", os.path.join(out, "torch_training.json")], cwd=args.perf_dir, env=env)
        run([args.efformer, "bench-train", "--attentions", ",".join(row[2] for row in TRAINING),
             "--lengths", ns, "--steps", str(args.steps),
             "--json", os.path.join(out, "efformer_training.json")], env=env)
    info = machine(args.python)
    info["threads"] = args.threads
    with open(os.path.join(out, "machine.json"), "w") as f:
        json.dump(info, f, indent=2)


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, list) else [data]


def ratio(ours, theirs):
    if ours is None or theirs is None or theirs == 0:
        return "–"
    return f"{ours / theirs:.2f}"


def ms(x):
    return "–" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def render(out):
    info = load(os.path.join(out, "machine.json"))
    if not info:
        sys.exit(f"error: {out}/machine.json missing: measure first (drop --render-only)")
    info = info[0]
    torch = {(r["variant"], r["n"]): r for r in load(os.path.join(out, "torch_attention.json"))}
    ours = {}
    for mode in ("bidirectional", "causal"):
        for r in load(os.path.join(out, f"efformer_{mode}.json")):
            ours[(r["variant"], mode, r["n"], r["pass"])] = r
    ns = sorted({n for (_, n) in torch})
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['simd']}, {info['cores']} cores), "
        f"{info['threads']} threads each, PyTorch {info['torch']}; batch 1, 8 heads × 64, "
        "attention core only, median wall ms. Ratios below 1 mean efformer is faster.",
        "",
        "| algorithm | N | PyTorch fwd / fwd+bwd ms | efformer fwd / fwd+bwd ms | efformer ÷ PyTorch |",
        "|---|---:|---|---|---|",
    ]
    for label, tv, ov, mode in ATTENTION:
        for i, n in enumerate(ns):
            t = torch.get((tv, n))
            tf = t and t.get("fwd", {}).get("median_ms")
            tb = t and t.get("fwdbwd", {}).get("median_ms")
            of = ours.get((ov, mode, n, "forward"), {}).get("median_ms")
            ob = ours.get((ov, mode, n, "forward_backward"), {}).get("median_ms")
            lines.append(f"| {label if i == 0 else ''} | {n:,} | {ms(tf)} / {ms(tb)} | "
                         f"{ms(of)} / {ms(ob)} | {ratio(of, tf)} / {ratio(ob, tb)} |")
    t_train = {(r["attn"], r["n"]): r for r in load(os.path.join(out, "torch_training.json"))}
    o_train = {(r["attention"], r["n"]): r for r in load(os.path.join(out, "efformer_training.json"))}
    if t_train or o_train:
        lines += [
            "",
            "Whole training steps (forward, backward, AdamW) of `train_step_bench.py`'s model: "
            "4 pre-LN layers, d 256, 4 heads, FFN 1,024, batch 8. Tokens/s (higher is better) "
            "and the process's peak resident memory.",
            "",
            "| attention | N | PyTorch tokens/s (peak MiB) | efformer tokens/s (peak MiB) | efformer ÷ PyTorch tokens/s |",
            "|---|---:|---|---|---|",
        ]
        for label, ta, oa in TRAINING:
            for i, n in enumerate(ns):
                t, o = t_train.get((ta, n)), o_train.get((oa, n))
                tt = t and t.get("tokens_per_s")
                ot = o and o.get("tokens_per_s")
                tm = t and t.get("peak_rss_mib")
                om = o and o.get("peak_bytes") and o["peak_bytes"] / 2**20
                cell = lambda x, m: "–" if x is None else f"{x:,.0f} ({m:,.0f})" if m else f"{x:,.0f}"
                lines.append(f"| {label if i == 0 else ''} | {n:,} | {cell(tt, tm)} | "
                             f"{cell(ot, om)} | {ratio(ot, tt)} |")
    return "\n".join(lines)


def splice(doc, table, out):
    with open(doc) as f:
        text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        sys.exit(f"error: {doc} has no `{BEGIN} -->` … `{END}` markers to write between")
    rel = os.path.relpath(out, ROOT)
    block = (f"{BEGIN} (generated by `scripts/vs_pytorch.py` from `{rel}/`; edits here are "
             f"overwritten) -->\n\n{table}\n\n")
    with open(doc, "w") as f:
        f.write(text[:start] + block + text[end:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable, help="a Python with torch and psutil")
    ap.add_argument("--perf-dir", default=os.path.join(ROOT, "..", "shared", "notes", "perf"),
                    help="the directory of attn_bench.py and train_step_bench.py")
    ap.add_argument("--efformer", default=os.path.join(ROOT, "target", "release", "efformer"))
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per case")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "vs-pytorch"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if not args.render_only:
        for path, what in ((args.efformer, "efformer binary (cargo build --release -p train)"),
                           (os.path.join(args.perf_dir, "attn_bench.py"), "attn_bench.py")):
            if not os.path.exists(path):
                sys.exit(f"error: {what} not found at {path}")
        measure(args, args.out)
    splice(args.doc, render(args.out), args.out)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
