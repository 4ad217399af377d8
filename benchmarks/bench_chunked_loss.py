"""The chunked head + cross-entropy against the plain one, side by side: full training steps of one model, the two
variants alternated for several rounds (a noisy machine slows both alike), median step time, ratio and peak memory.

    python benchmarks/bench_chunked_loss.py --model d6 --batch_size 8 --seq_len 256 --rounds 3
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402
from bench_step import time_training_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="d6", help="size preset")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=3, help="alternations of plain and chunked")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each timing")
    p.add_argument("--compile", action="store_true", help="torch.compile both variants")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slow on a CPU without native bf16)")
    p.add_argument("--device", default="cpu", help="device to time on")
    args = p.parse_args()

    config = tg.model_config(args.model)
    device = torch.device(args.device)
    results: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.rounds):
        for chunked in (False, True):
            results[chunked].append(time_training_step(
                config, device, args.batch_size, args.seq_len, args.steps, args.warmup, compile=args.compile,
                bf16=args.bf16, chunked=chunked))
            row = results[chunked][-1]
            print(f"round {r + 1} {'chunked' if chunked else 'plain  '}: {row['ms']:.0f} ms/step, "
                  f"{row['tok_per_s']:,.0f} tok/s, peak {row['memory'] / 2**30:.2f} GiB", flush=True)
    medians = {k: statistics.median(row["ms"] for row in v) for k, v in results.items()}
    peaks = {k: max(row["memory"] for row in v) for k, v in results.items()}
    ratios = [p["ms"] / c["ms"] for p, c in zip(results[False], results[True])]
    print(f"{args.model} B={args.batch_size} T={args.seq_len}{' compiled' if args.compile else ''}: "
          f"plain {medians[False]:.0f} ms, chunked {medians[True]:.0f} ms (median); per-round speed-up "
          f"{', '.join(f'{x:.2f}x' for x in ratios)}; peak memory {peaks[False] / 2**30:.2f} -> "
          f"{peaks[True] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
