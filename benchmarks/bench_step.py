"""Time train_gpt2.py's training step: ms/step, tok/s, MFU and peak memory of the flags given, or with --ladder the
same model with each optimisation added in turn, from fp32 eager with a hand-written attention.

    python benchmarks/bench_step.py --model d6 --seq_len 256 --batch_size 8        # this configuration's step
    python benchmarks/bench_step.py --model gpt2 --batch_size 16 --ladder          # what each optimisation buys

The model, data, optimizer and system flags are the trainer's own (--help lists them). A step is forward, backward,
clipping and the optimizer's update, on random tokens (or --data real: --data_dir's train shards); each row is the
median of --steps timed steps after --warmup untimed ones. Other benchmarks import time_training_step from here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import unittest.mock
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402

# the trainer's flags a step depends on, and what the two that differ mean here
SHARED_FLAGS = ("model", *tg.ARCH_FLAGS, "untie", "data_dir", "seq_len", "batch_size", "recipe", "optimizer",
                "device", "dtype", "chunked_loss", "compile", "peak_tflops")
HELPS = {"data_dir": "train shards: what --data real reads, and what the loader's speed is measured on",
         "batch_size": "sequences per timed step (B)"}

# One row per optimisation, each keeping those above it; the first row is a straightforward implementation
LADDER = [
    ("fp32 eager, manual attention, vocab 50257, for-loop AdamW", {}),
    ("+ TF32 matmuls", {"tf32": True}),
    ("+ bf16 autocast", {"bf16": True}),
    ("+ SDPA (flash) attention", {"sdpa": True}),
    ("+ vocab padded to 50304", {"padded": True}),
    ("+ fused AdamW", {"fused": True}),
    ("+ torch.compile", {"compile": True}),
    ("+ chunked linear + cross-entropy", {"chunked": True}),
]


class PeakRSS:
    """The highest resident set size seen while inside the block, sampled every 2 ms from /proc (a CPU has no
    allocator statistics, and the process-wide maximum would carry over from earlier runs in the same process)."""

    def __enter__(self) -> "PeakRSS":
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process-wide maximum is the best there is
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, **_) -> torch.Tensor:
    """softmax(QK^T / sqrt(head_dim))V with the mask written out, as GPT-2 implementations computed attention before
    fused kernels: scaled_dot_product_attention's arguments, the ladder's baseline."""
    T, S = q.size(-2), k.size(-2)
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
        if is_causal:
            attn_mask = attn_mask.tril(diagonal=S - T)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    weights = F.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1)
    return F.dropout(weights, dropout_p) @ v


@contextmanager
def attention_kernel(sdpa: bool):
    """The model's attention as it is (SDPA's fused kernels), or with manual_attention in SDPA's place."""
    if sdpa:
        yield
        return
    with unittest.mock.patch.object(F, "scaled_dot_product_attention", manual_attention):
        yield


def make_optimizers(model: torch.nn.Module, device: torch.device, optimizer: str, fused: bool,
                    settings: tg.Settings | None) -> list[torch.optim.Optimizer]:
    """AdamW (fused or the plain for-loop), or the trainer's optimisers of `settings` (default: `optimizer` with its
    default hyperparameters)."""
    if optimizer == "adamw" and settings is None:
        return [tg.adamw(list(model.parameters()), 1e-4, 0.1, device.type, fused=fused)]
    return tg.configure_optimizers(model, settings or tg.Settings(optimizer=optimizer), device.type,
                                   tg.fast_matmul_dtype(device))


def time_training_step(config: tg.GPTConfig, device: torch.device, batch_size: int, seq_len: int, steps: int,
                       warmup: int, data_dir: str | None = None, tf32: bool = False, bf16: bool = False,
                       sdpa: bool = True, padded: bool = True, fused: bool = True, compile: bool = False,
                       chunked: bool = False, optimizer: str = "adamw", settings: tg.Settings | None = None) -> dict:
    """Median time of a full training step (forward, backward, clip, optimizer) after `warmup` untimed steps, on
    synthetic tokens (or data_dir's train shards), with each optimisation switchable; the model FLOP/s it achieves
    and the peak memory."""
    if not padded:
        config = tg.GPTConfig(**{**asdict(config), "padded_vocab_size": config.vocab_size})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    model = tg.GPT(config).to(device)
    model.chunked_loss = chunked
    optimizers = make_optimizers(model, device, optimizer, fused, settings)
    forward = torch.compile(model) if compile else model
    amp_ctx = torch.autocast(device.type, dtype=dtype) if bf16 else nullcontext()
    loader = tg.ShardLoader(data_dir, "train", batch_size, seq_len) if data_dir else None
    generator = torch.Generator().manual_seed(0)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss, attention_kernel(sdpa):
        for i in range(warmup + steps):
            if loader is not None:
                x, y = loader.next_batch()
            else:
                tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
                x, y = tokens[:, :-1], tokens[:, 1:]
            x, y = x.to(device), y.to(device)
            t0 = time.perf_counter()
            with amp_ctx:
                _, loss = forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            tg.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    return {"ms": 1000 * dt, "tok_per_s": batch_size * seq_len / dt, "memory": memory, "dtype": dtype,
            "flops_per_s": tg.flops_per_token(config, seq_len, model.num_params()) * batch_size * seq_len / dt}


def time_loader(data_dir: str, batch_size: int, seq_len: int, device: torch.device, batches: int = 200) -> float:
    """Tokens/s the training loader delivers to the device on its own (memory-mapped shards, one copy to the
    device), to set beside a step's tokens/s: the loop reads a batch between steps, so the loader costs the step
    time times step_tok_s / loader_tok_s."""
    loader = tg.ShardLoader(data_dir, "train", batch_size, seq_len)
    loader.next_batch()  # first touch of the memory map
    t0 = time.perf_counter()
    for _ in range(batches):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    tg.synchronize(device)
    return batches * batch_size * seq_len / (time.perf_counter() - t0)


def add_mfu(rows: list[dict], device: torch.device, peak_tflops: float | None) -> None:
    """MFU of each timed row against the peak of its dtype, probed once per dtype on CPU and raised to any row that
    beats it (a probe on a busy machine can come out low), so every row shares one yardstick and none exceeds 100%."""
    for dtype in {r["dtype"] for r in rows}:
        same = [r for r in rows if r["dtype"] == dtype]
        peak = tg.device_peak_flops(device, dtype, peak_tflops)
        if peak and device.type == "cpu" and not peak_tflops:
            peak = max([peak] + [r["flops_per_s"] for r in same])
        for r in same:
            r["mfu"] = r["flops_per_s"] / peak if peak else None


def ladder_skip_reason(settings: dict, device: torch.device) -> str | None:
    if settings.get("tf32") and device.type != "cuda":
        return "TF32 is a CUDA tensor-core mode"
    if settings.get("bf16") and not tg.native_bf16(device):
        return f"this {device.type} has no native bf16 (emulated, far slower than fp32): the rows below stay fp32"
    return None


def print_ladder(rows: list[dict]) -> None:
    """The ladder's table: each timed row against the one before and the first."""
    timed = [r for r in rows if "skipped" not in r]
    print("| step | ms/step | tok/s | MFU | peak memory | vs previous | vs first |")
    print("|---|---|---|---|---|---|---|")
    previous = timed[0]
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | skipped: {r['skipped']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['name']} | {r['ms']:.1f} | {r['tok_per_s']:,.0f} | {mfu} | {r['memory'] / 2**30:.2f} GiB | "
              f"{r['tok_per_s'] / previous['tok_per_s']:.2f}x | {r['tok_per_s'] / timed[0]['tok_per_s']:.2f}x |")
        previous = r


def print_loader_speed(data_dir: str, batch_size: int, seq_len: int, device: torch.device,
                       step_tok_per_s: float) -> None:
    try:
        loader_tok_per_s = time_loader(data_dir, batch_size, seq_len, device)
    except tg.UserError as e:
        print(f"loader: not timed ({e})")
        return
    print(f"loader: {loader_tok_per_s:,.0f} tok/s from {data_dir} vs {step_tok_per_s:,.0f} tok/s for the fastest "
          f"step above ({loader_tok_per_s / step_tok_per_s:,.0f}x): reading batches takes "
          f"{100 * step_tok_per_s / loader_tok_per_s:.2f}% of a step")


def benchmark(args: argparse.Namespace, settings: tg.Settings) -> None:
    """The step of these settings, or the ladder; then the loader's speed beside the fastest step."""
    device = tg.resolve_device(settings.device, 0)
    config, _ = tg.model_from_settings(settings)
    data_dir = settings.data_dir if args.data == "real" else None
    common = dict(batch_size=settings.batch_size, seq_len=settings.seq_len, steps=args.steps, warmup=args.warmup,
                  data_dir=data_dir)
    print(f"benchmark: {settings.model}, B={settings.batch_size}, T={settings.seq_len}, device {device}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {'train shards' if data_dir else 'synthetic tokens'}",
          flush=True)
    if not args.ladder:
        dtype = tg.resolve_dtype(settings.dtype, device)
        r = time_training_step(config, device, tf32=device.type == "cuda", bf16=dtype == torch.bfloat16,
                               compile=tg.resolve_compile(settings.compile, device), chunked=settings.chunked_loss,
                               optimizer=settings.optimizer, settings=settings, **common)
        add_mfu([r], device, settings.peak_tflops)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['ms']:.1f} ms/step | {r['tok_per_s']:,.0f} tok/s | MFU {mfu} | "
              f"peak memory {r['memory'] / 2**30:.2f} GiB")
        fastest = r["tok_per_s"]
    else:
        switches, rows = {"sdpa": False, "padded": False, "fused": False}, []
        for name, change in LADDER:
            reason = ladder_skip_reason(change, device)
            if reason is None:
                switches.update(change)
                print(f"timing: {name}", flush=True)
                rows.append({"name": name, **time_training_step(config, device, **switches, **common)})
            else:
                rows.append({"name": name, "skipped": reason})
        timed = [r for r in rows if "skipped" not in r]
        add_mfu(timed, device, settings.peak_tflops)
        print_ladder(rows)
        fastest = max(r["tok_per_s"] for r in timed)
    print_loader_speed(settings.data_dir, settings.batch_size, settings.seq_len, device, fastest)


def build_parser() -> argparse.ArgumentParser:
    p = tg.build_parser(__doc__.splitlines()[0], names=SHARED_FLAGS, helps=HELPS)
    p.add_argument("--ladder", action="store_true",
                   help="time the step with each optimisation added in turn, from fp32 eager with manual attention")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (the median is shown)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each row")
    p.add_argument("--data", choices=["synthetic", "real"], default="synthetic",
                   help="random tokens, or --data_dir's train shards")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    flags, explicit = tg.parse_flags(argv, parser)
    own = {name: flags.pop(name) for name in ("ladder", "steps", "warmup", "data")}
    # the trainer's Settings of these flags (its defaults for the rest): one micro-step is the whole batch here
    flags["total_batch_size"] = flags["batch_size"] * flags["seq_len"]
    try:
        benchmark(argparse.Namespace(**own), tg.resolve_settings(flags, explicit))
    except tg.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
