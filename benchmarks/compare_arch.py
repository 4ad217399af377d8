"""
Classic GPT-2 vs the modern options vs the modern options trained with Muon, at equal training tokens, on the
bundled Gutenberg corpus (run `python prepare_fineweb.py --sample` first).

  python benchmarks/compare_arch.py                       # d4, 100 steps of 4,096 tokens each, seed 1337
  python benchmarks/compare_arch.py --model d6 --steps 200

Every run uses the same preset, data order, batch, schedule and seed; only the flags in the table differ. The table
gives the final validation loss (over --val_tokens held-out tokens), the best one seen, and the median tokens/s of
the timed steps (the first two, which include warm-up, are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_gpt2.py")

MODERN = ["--norm", "rmsnorm", "--pos", "rope", "--mlp", "swiglu", "--no-bias", "--n_kv_head", "2"]
VARIANTS = {
    "classic (GPT-2)": [],
    "modern (rmsnorm, rope, swiglu, GQA 2, no bias)": MODERN,
    "modern + Muon": MODERN + ["--optimizer", "muon"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="d4", help="size preset shared by all runs")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--total_batch_size", type=int, default=4096, help="tokens per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak LR (for Muon: its AdamW part)")
    p.add_argument("--val_tokens", type=int, default=32768, help="held-out tokens per validation")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data", "gutenberg"), help="shards to train on")
    p.add_argument("--out_dir", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()

    root = args.out_dir or tempfile.mkdtemp(prefix="compare_arch_")
    rows = []
    for i, (name, flags) in enumerate(VARIANTS.items()):
        out = os.path.join(root, f"run{i}")
        cmd = [sys.executable, SCRIPT, "--model", args.model, "--data_dir", args.data_dir, "--out_dir", out,
               "--seq_len", str(args.seq_len), "--batch_size", str(args.total_batch_size // args.seq_len // 2),
               "--total_batch_size", str(args.total_batch_size), "--max_steps", str(args.steps),
               "--warmup_steps", str(max(1, args.steps // 10)), "--lr", str(args.lr),
               "--val_every", str(max(1, args.steps // 4)), "--val_tokens", str(args.val_tokens),
               "--sample_every", "0", "--save_every", "0", "--seed", "1337", *flags]
        print(f"running {name}: {' '.join(flags) or '(defaults)'}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        vals = [r["val_loss"] for r in log if "val_loss" in r]
        speeds = [r["tok_per_s"] for r in log if "tok_per_s" in r][2:]
        rows.append((name, vals[-1], min(vals), statistics.median(speeds)))

    tokens = args.steps * args.total_batch_size
    print(f"\n{args.model}, {args.steps} steps x {args.total_batch_size:,} tokens = {tokens:,} training tokens, "
          f"seed 1337\n")
    print("| variant | final val loss | best val loss | tokens/s |")
    print("|---|---|---|---|")
    for name, final, best, speed in rows:
        print(f"| {name} | {final:.4f} | {best:.4f} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
