"""
The classic GPT-2 recipe against --recipe speedrun at equal tokens, then the speedrun with each of its pieces taken
out in turn. Same preset, seed, data and batch for every run; only the recipe flags differ.

  python prepare_fineweb.py --sample && python benchmarks/speedrun.py      # d4 and d6, 110 steps of 4,096 tokens
  python benchmarks/speedrun.py --models d4 --no-ablation                          # the comparison only
  python benchmarks/speedrun.py --data_dir data/mine --models d4                   # another corpus

The classic recipe is build-nanogpt's: AdamW at 1e-3 (betas 0.9/0.95, weight decay 0.1), 20 warmup steps, cosine to
10%. Validation loss is over the whole val split (up to --val_tokens), every --val_every steps. "Reaches" is the first
evaluated step at or below the classic run's final validation loss: its tokens, and the training seconds up to it
(the sum of the logged step times, evaluation excluded), as fractions of the classic run's. tok/s is the median over
the steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_gpt2.py")

CLASSIC = ["--lr", "1e-3", "--warmup_steps", "20", "--lr_schedule", "cosine", "--min_lr_ratio", "0.1"]
SPEEDRUN = ["--recipe", "speedrun"]
# Each piece of the recipe, and the flags that take it out again (the rest of the recipe stays)
ABLATIONS = {
    "normuon + AdamW groups -> AdamW 3e-3 for all": ["--optimizer", "adamw", "--lr", "3e-3"],
    "normuon -> muon": ["--optimizer", "muon"],
    "wsd -> cosine": ["--lr_schedule", "cosine"],
    "no momentum warmup": ["--muon_momentum_warmup", "0"],
    "tied embeddings": ["--no-untie"],
    "no qk_norm": ["--no-qk_norm"],
    "no embed_norm": ["--no-embed_norm"],
    "no x0_lambdas": ["--no-x0_lambdas"],
    "no zero_init": ["--no-zero_init"],
    "relu2 -> gelu": ["--mlp", "gelu"],
    "rmsnorm, rope -> layernorm, learned": ["--norm", "layernorm", "--pos", "learned"],
    "(added) logit softcap 15": ["--logit_softcap", "15"],
    "no bos_aligned, no shuffle": ["--no-bos_aligned", "--no-shuffle"],
}


def cpu_line() -> str:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    name = re.search(r"model name\s*:\s*(.*)", flags)
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{name.group(1) if name else platform.processor()}, {os.cpu_count()} cores, "
            f"{'native bf16 (' + ', '.join(native) + ')' if native else 'no native bf16 (fp32)'}")


def train(args: argparse.Namespace, model: str, flags: list[str], out: str, val_every: int) -> tuple[list[dict], str]:
    cmd = [sys.executable, SCRIPT, "--model", model, "--data_dir", args.data_dir, "--out_dir", out,
           "--seq_len", str(args.seq_len), "--batch_size", str(args.total_batch_size // args.seq_len),
           "--total_batch_size", str(args.total_batch_size), "--max_steps", str(args.steps),
           "--val_every", str(val_every), "--val_tokens", str(args.val_tokens), "--sample_every", "0",
           "--save_every", "0", "--seed", str(args.seed), "--dtype", args.dtype, "--device", "cpu", *flags]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"run failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    dtype = re.search(r"dtype (\w+)", run.stdout)
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f], dtype.group(1) if dtype else "?"


def summary(log: list[dict]) -> dict:
    vals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    steps = [r for r in log if "dt_ms" in r]
    return {"vals": vals, "final": vals[max(vals)], "tok_s": statistics.median(r["tok_per_s"] for r in steps[2:]),
            "seconds": {r["step"]: sum(s["dt_ms"] for s in steps if s["step"] <= r["step"]) / 1000 for r in steps}}


def compare(args: argparse.Namespace, model: str, root: str) -> None:
    if not args.comparison:
        ablate(args, model, root, None)
        return
    classic_log, dtype = train(args, model, CLASSIC, os.path.join(root, f"{model}_classic"), args.val_every)
    speed_log, _ = train(args, model, SPEEDRUN, os.path.join(root, f"{model}_speedrun"), args.val_every)
    classic, speed = summary(classic_log), summary(speed_log)
    tokens = args.total_batch_size
    print(f"\n## {model}: {args.steps} steps x {tokens:,} tokens, seed {args.seed}, dtype {dtype}\n")
    print("| step | tokens | classic val | speedrun val | difference |")
    print("|---|---|---|---|---|")
    for step in sorted(set(classic["vals"]) & set(speed["vals"])):
        c, s = classic["vals"][step], speed["vals"][step]
        print(f"| {step} | {step * tokens:,} | {c:.4f} | {s:.4f} | {s - c:+.4f} |")
    target = classic["final"]
    reached = [step for step, v in sorted(speed["vals"].items()) if v <= target]
    total_s = classic["seconds"][args.steps]
    print(f"\nclassic final val {target:.4f} after {args.steps * tokens:,} tokens and {total_s:.1f} s of training")
    if reached:
        step = reached[0]
        print(f"speedrun reaches it at step {step}: {step * tokens:,} tokens ({step / args.steps:.2f}x) and "
              f"{speed['seconds'][step]:.1f} s of training ({speed['seconds'][step] / total_s:.2f}x)")
    else:
        print("speedrun does not reach it")
    print(f"at equal tokens ({args.steps} steps): classic {target:.4f}, speedrun {speed['final']:.4f} "
          f"({speed['final'] - target:+.4f})")
    print(f"tok/s (median): classic {classic['tok_s']:,.0f}, speedrun {speed['tok_s']:,.0f} "
          f"({speed['tok_s'] / classic['tok_s']:.2f}x)")
    if args.ablation:
        ablate(args, model, root, speed["final"])


def ablate(args: argparse.Namespace, model: str, root: str, full: float | None) -> None:
    full = full or args.full_val
    if full is None:
        full = summary(train(args, model, SPEEDRUN, os.path.join(root, f"{model}_full"), args.steps)[0])["final"]
    print(f"\n| {model}: speedrun without | final val | vs the full recipe ({full:.4f}) | tok/s |")
    print("|---|---|---|---|")
    for i, (name, flags) in enumerate(ABLATIONS.items()):
        if args.only and not any(word in name for word in args.only):
            continue
        log, _ = train(args, model, SPEEDRUN + flags, os.path.join(root, f"{model}_ablation{i}"), args.steps)
        s = summary(log)
        print(f"| {name} (`{' '.join(flags)}`) | {s['final']:.4f} | {s['final'] - full:+.4f} | {s['tok_s']:,.0f} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["d4", "d6"], help="size presets to compare")
    p.add_argument("--steps", type=int, default=110, help="optimizer steps per run")
    p.add_argument("--total_batch_size", type=int, default=4096, help="tokens per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--val_tokens", type=int, default=100_000, help="held-out tokens per validation")
    p.add_argument("--val_every", type=int, default=5, help="steps between validations in the comparison")
    p.add_argument("--seed", type=int, default=1337, help="seed of every run")
    p.add_argument("--dtype", default="auto", help="--dtype of every run (auto: what the CPU runs natively)")
    p.add_argument("--comparison", action=argparse.BooleanOptionalAction, default=True,
                   help="the classic recipe against the speedrun, validated every --val_every steps")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the speedrun with each piece taken out (final validation only)")
    p.add_argument("--only", nargs="+", default=None, metavar="WORD",
                   help="run only the ablation rows whose name contains one of these words")
    p.add_argument("--full_val", type=float, default=None,
                   help="with --no-comparison: the full recipe's final val loss, known from a comparison run "
                        "with the same settings (evaluation does not change training), instead of training it again")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data", "gutenberg"), help="shards to train on")
    p.add_argument("--out_dir", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    root = args.out_dir or tempfile.mkdtemp(prefix="speedrun_")
    print(f"cpu: {cpu_line()}; data {args.data_dir}", flush=True)
    for model in args.models:
        compare(args, model, root)


if __name__ == "__main__":
    main()
