"""
HellaSwag scoring throughput on CPU: many examples per forward pass against one example (4 rows) per forward pass.

  python benchmarks/bench_hellaswag.py                        # random-init d6, bundled sample repeated to 52 examples
  python benchmarks/bench_hellaswag.py --checkpoint out/d6/ckpt_0000500.pt --data_file hellaswag_val.jsonl --n 500
  python benchmarks/bench_hellaswag.py --dtype fp32 bf16      # one table row pair per autocast dtype

Each round times both modes back to back on the same examples, so that whatever else the machine is doing slows
both alike; the table reports the median examples/s over the rounds and the batched/unbatched ratio. Both modes
must reach the same acc and acc_norm (the scores do not depend on the batching). Batching saves per-call overhead
and small, under-filled matmuls; on a CPU, where one example's 4 rows already keep the cores busy, it gains little.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import hellaswag_eval as H  # noqa: E402
import train_gpt2  # noqa: E402

SAMPLE = os.path.join(REPO, "tests", "data", "hellaswag_sample.jsonl")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", help="a train_gpt2.py checkpoint (default: a random-init model of --model)")
    p.add_argument("--model", default="d6", help="preset for the random-init model (default d6)")
    p.add_argument("--data_file", default=SAMPLE, help="HellaSwag jsonl (default: the bundled 13-example sample)")
    p.add_argument("--n", type=int, default=52, help="examples per round; the file is repeated to reach it")
    p.add_argument("--batch_size", type=int, default=H.DEFAULT_BATCH_SIZE, help="examples per forward when batched")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (the median is reported)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["auto"], help="autocast dtype(s) to time")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = train_gpt2.load_checkpoint_model(args.checkpoint, "cpu")
        name = args.checkpoint
    else:
        torch.manual_seed(0)
        model = train_gpt2.GPT(train_gpt2.model_config(args.model)).eval()
        name = f"{args.model} (random init)"
    base = H.load_examples(args.data_file)
    examples = [base[i % len(base)] for i in range(args.n)]
    print(f"model {name}, {model.num_params():,} parameters | {len(examples)} examples from {args.data_file} | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    print(f"{'dtype':>14} {'examples/forward':>17} {'forwards':>9} {'examples/s':>11} {'acc_norm':>9}")
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name] or H.default_autocast_dtype("cpu")
        label = f"{dtype_name}->{str(dtype)[6:]}" if dtype_name == "auto" else dtype_name
        modes = {args.batch_size: [], 1: []}
        results = {}
        for bs in modes:  # warm-up (allocator, kernels), not timed
            H.evaluate(model, examples[: 2 * bs], "cpu", batch_size=bs, autocast_dtype=dtype)
        for _ in range(args.rounds):
            for bs, rates in modes.items():
                t0 = time.perf_counter()
                results[bs] = H.evaluate(model, examples, "cpu", batch_size=bs, autocast_dtype=dtype)
                rates.append(len(examples) / (time.perf_counter() - t0))
        if results[args.batch_size]["correct_norm"] != results[1]["correct_norm"] or \
                results[args.batch_size]["correct"] != results[1]["correct"]:
            print(f"warning: batched and unbatched results differ: {results[args.batch_size]} vs {results[1]}")
        medians = {bs: statistics.median(rates) for bs, rates in modes.items()}
        for bs in modes:
            print(f"{label:>14} {bs:>17} {-(-len(examples) // bs):>9} {medians[bs]:>11.1f} "
                  f"{results[bs]['acc_norm']:>9.4f}")
        print(f"{label:>14} batched / one example per forward: {medians[args.batch_size] / medians[1]:.2f}x")


if __name__ == "__main__":
    main()
