"""
Our training step against build-nanogpt's, side by side: same model shape, same synthetic tokens, same dtype.

  git clone https://github.com/karpathy/build-nanogpt /tmp/build-nanogpt
  python benchmarks/bench_step_peer.py /tmp/build-nanogpt
  python benchmarks/bench_step_peer.py /tmp/build-nanogpt --model gpt2 --seq_len 1024 --batch_size 4 --rounds 2

The peer's GPT and configure_optimizers come from the clone's train_gpt2.py as published: the text above its data
loader section (the line `import tiktoken` after a `# ----` rule) is executed as a module, with its one import of
the clone's hellaswag.py dropped (evaluation only) and `master_process = False` set so that configure_optimizers
prints nothing. Its step is its training loop's: forward under bf16 autocast (plain fp32 where this CPU has no
native bf16, as ours then runs), backward, clip_grad_norm_(1.0), AdamW (fused only on CUDA, as its code decides).
Ours is time_training_step, the step bench_step.py times: the default chunked head + cross-entropy, or the plain
head with --plain. Each variant is timed eagerly and under torch.compile; each round times every variant once, in
the same order, so that whatever else the machine does slows all alike. The table gives the median over rounds of
each variant's median step and each one's speed relative to the peer's compiled step, then the median of the
per-round ratios of the compiled steps (ours against the peer's in the same round), which a noisy machine moves less.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402
from bench_step import time_training_step  # noqa: E402


def load_peer(clone: str) -> types.ModuleType:
    """build-nanogpt's model section as a module, or a one-line error if the clone does not have it."""
    path = os.path.join(clone, "train_gpt2.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: pass a clone of https://github.com/karpathy/build-nanogpt")
    with open(path) as f:
        text = f.read()
    end = text.find("\nimport tiktoken")
    if end < 0 or "class GPT(nn.Module)" not in text[:end]:
        raise SystemExit(f"error: {path} does not have build-nanogpt's layout (model, then `import tiktoken`)")
    source = "\n".join(line for line in text[:end].splitlines() if not line.startswith("from hellaswag import"))
    module = types.ModuleType("peer_train_gpt2")
    module.__dict__["master_process"] = False
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, path, "exec"), module.__dict__)  # the peer's own file, read from the clone
    return module


def time_peer_step(peer: types.ModuleType, config: tg.GPTConfig, device: torch.device, batch_size: int,
                   seq_len: int, steps: int, warmup: int, bf16: bool, compile: bool) -> dict:
    """Median ms of the peer's training step, on the same synthetic tokens as time_training_step draws."""
    torch.manual_seed(0)
    model = peer.GPT(peer.GPTConfig(block_size=config.block_size, vocab_size=config.padded_vocab_size,
                                    n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)).to(device)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type=device.type)
    forward = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
        # contiguous, as the peer's loader hands them out: its loss views the targets
        x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tg.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("clone", help="path of a local clone of karpathy/build-nanogpt")
    p.add_argument("--model", default="d6", help="size preset of both models")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=3, help="times every variant is timed, in turn")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing (compilation included)")
    p.add_argument("--device", default="cpu", help="device to time on")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the device computes it natively, else fp32; both sides use it")
    p.add_argument("--plain", action="store_true", help="time our plain head + cross-entropy, not the chunked one")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="time the compiled variants only")
    args = p.parse_args()

    peer = load_peer(args.clone)
    device = torch.device(args.device)
    bf16 = tg.resolve_dtype(args.dtype, device) == torch.bfloat16
    config = tg.model_config(args.model)
    tokens = args.batch_size * args.seq_len
    print(f"{cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)} | "
          f"{'bf16 autocast' if bf16 else 'fp32'} | torch {torch.__version__} | {args.model}, B={args.batch_size}, "
          f"T={args.seq_len} | {args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    modes = [False, True] if args.eager else [True]
    variants = [(f"build-nanogpt{' compiled' if c else ' eager'}", "peer", c) for c in modes]
    variants += [(f"ours{' compiled' if c else ' eager'}", "ours", c) for c in modes]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        for name, who, use_compile in variants:
            common = dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                          bf16=bf16, compile=use_compile)
            if who == "peer":
                ms = time_peer_step(peer, config, device, **common)["ms"]
            else:
                ms = time_training_step(config, device, chunked=not args.plain, **common)["ms"]
            times[name].append(ms)
            print(f"round {r + 1}: {name}: {ms:.0f} ms/step", flush=True)
    reference = statistics.median(times["build-nanogpt compiled"])
    print("| step | ms/step (median) | tok/s | vs build-nanogpt compiled |")
    print("|---|---|---|---|")
    for name, _, _ in variants:
        ms = statistics.median(times[name])
        print(f"| {name} | {ms:.0f} | {1000 * tokens / ms:,.0f} | {reference / ms:.2f}x |")
    ratios = [peer / ours for peer, ours in zip(times["build-nanogpt compiled"], times["ours compiled"])]
    print(f"ours compiled vs build-nanogpt compiled, per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
