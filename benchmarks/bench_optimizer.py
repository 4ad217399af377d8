"""What Muon and NorMuon cost over AdamW: full training steps of one model with each optimizer, alternated for
several rounds (a noisy machine slows all alike), the median step and its ratio to AdamW's.

    python benchmarks/bench_optimizer.py --model d6 --batch_size 8 --seq_len 256 --rounds 3

A step here is one micro-batch and one optimizer step. Muon's orthogonalisation costs a fixed number of FLOPs per
weight matrix, whatever the batch, so the last column spreads the measured extra time over the micro-steps of
--total_batch_size (the trainer's default: 524,288 tokens per optimizer step).
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402
from bench_step import time_training_step  # noqa: E402
from bench_step_peer import cpu_name  # noqa: E402


def orthogonalization_flops(config: tg.GPTConfig, iterations: int) -> float:
    """Matmul FLOPs of the Newton-Schulz / Polar Express iterations over the blocks' weight matrices."""
    model = tg.GPT(config)
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("transformer.h.") and p.dim() == 2:
            m, n = sorted(p.shape)  # iterated on the wide orientation: X X^T is m x m
            total += iterations * 2 * (2 * m * m * n + m ** 3)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="d6", help="size preset")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the optimizers")
    p.add_argument("--steps", type=int, default=4, help="timed steps per optimizer and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing")
    p.add_argument("--total_batch_size", type=int, default=524288,
                   help="tokens per optimizer step, for the last column")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not the optimizers)")
    p.add_argument("--device", default="cpu", help="device to time on")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the device computes it natively, else fp32")
    args = p.parse_args()

    device = torch.device(args.device)
    bf16 = tg.resolve_dtype(args.dtype, device) == torch.bfloat16
    config = tg.model_config(args.model)
    print(f"{cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)} | "
          f"{'bf16 autocast' if bf16 else 'fp32'} (orthogonalisation in {'bf16' if tg.native_bf16(device) else 'fp32'})"
          f" | {args.model}, B={args.batch_size}, T={args.seq_len}", flush=True)
    names = ["adamw", "muon", "normuon"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            row = time_training_step(config, device, args.batch_size, args.seq_len, args.steps, args.warmup,
                                        bf16=bf16, compile=args.compile, chunked=True, optimizer=name)
            times[name].append(row["ms"])
            print(f"round {r + 1} {name}: {row['ms']:.0f} ms/step", flush=True)
    step_flops = tg.flops_per_token(config, args.seq_len, tg.GPT(config).num_params()) * args.batch_size * args.seq_len
    micro_steps = max(1, args.total_batch_size // (args.batch_size * args.seq_len))
    base = statistics.median(times["adamw"])
    print(f"orthogonalisation: {orthogonalization_flops(config, 5) / 1e9:.1f} GFLOP per optimizer step, against "
          f"{step_flops / 1e9:.1f} GFLOP of forward and backward per micro-step")
    print(f"| optimizer | ms/step (median) | vs AdamW | extra per step at {args.total_batch_size:,} tokens |")
    print("|---|---|---|---|")
    for name in names:
        ms = statistics.median(times[name])
        amortised = (ms - base) / (micro_steps * base)
        print(f"| {name} | {ms:.0f} | {ms / base:.2f}x | {100 * amortised:+.2f}% |")


if __name__ == "__main__":
    main()
