"""
Sample from a trained model: a checkpoint of train_gpt2.py, or Hugging Face weights, with its tokens/s.

  python sample.py --resume out/ckpt_0019073.pt --prompt "The meaning of life is"
  python sample.py --resume auto --out_dir out                  # the run's newest readable checkpoint
  python sample.py --init_from gpt2                             # a Hugging Face GPT-2 (or a local directory)
  python sample.py --resume out/ckpt_0019073.pt --int8 --device cpu --data_dir data/gutenberg

--int8 (CPU) adds the same sample from a copy whose every linear layer is dynamically quantised to int8, its
speed-up, and (where --data_dir has a val split) the change in validation loss.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn

import train_gpt2 as tg

# the trainer's flags this command shares, and what they mean here: which model, where, in what precision, and how
# to sample
SHARED_FLAGS = ("init_from", "data_dir", "seq_len", "batch_size", "seed", "device", "dtype", "val_tokens", "prompt",
                "sample_tokens", "top_k", "out_dir", "resume")
HELPS = {
    "resume": "the checkpoint to sample from: a .pt file, or 'auto' for the newest readable one in --out_dir",
    "out_dir": "the run whose checkpoint --resume auto picks",
    "init_from": "sample from Hugging Face weights instead (gpt2, ... or a local GPT-2/Llama directory)",
    "seed": "seed of the sample: the same weights and seed give the same text",
    "data_dir": "with --int8: the folder whose val shards the validation losses are measured on",
    "seq_len": "with --int8: tokens per validation sequence (at most the model's block_size)",
    "batch_size": "with --int8: validation sequences per forward pass",
    "val_tokens": "with --int8: validation tokens for each loss",
}


class Int8Linear(nn.Module):
    """Dynamic int8 quantisation of a Linear, for CPU inference: int8 weights with one scale per output row, and each
    call quantises its input, so the matmul runs in integers (fbgemm) and reads a quarter of the weight bytes. The
    input gets one scale per call, so a row's result depends slightly on the other rows of the call: one-token
    decoding steps are unaffected, a batch or a prompt's prefill are not bit-comparable with other batchings."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float().cpu()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated, but the int8 CPU kernels take them
            qweight = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0,
                                                 torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(
                qweight, None if bias is None else bias.detach().float().cpu())
        self.register_buffer("weight_int8", qweight.int_repr())
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1)).float()
        # reduce_range: 7-bit inputs, so AVX2's 16-bit pairwise products cannot saturate
        y = torch.ops.quantized.linear_dynamic(flat, self.packed, True)
        return y.view(*x.shape[:-1], -1).to(x.dtype)


class Int8GPT(tg.GPT):
    """The GPT with Int8Linear layers: its head is the quantised lm_head (the vocabulary mask as its bias unless the
    logits are softcapped), and the loss is always the plain one, since the chunked loss reads lm_head.weight."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        logits = self.lm_head(x)
        return tg.softcap(logits, cap) + self.vocab_mask if cap else logits


def int8_copy(model: tg.GPT) -> Int8GPT:
    """A copy of `model` for CPU sampling with every Linear (lm_head included) as Int8Linear; embeddings and norms
    stay as they are, and `model` is left alone."""
    copy = Int8GPT(model.config)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    for block in copy.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_fc", "c_proj"):
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, Int8Linear(linear.weight, linear.bias))
    copy.lm_head = Int8Linear(model.lm_head.weight, None if model.config.logit_softcap else copy.vocab_mask)
    return copy


def load_model(args: argparse.Namespace) -> tuple[tg.GPT, str]:
    """The model of --resume (a path, or auto: the newest readable checkpoint in --out_dir) or of --init_from, and
    where it came from."""
    if args.resume is not None:
        path, ckpt = tg.find_resume_checkpoint(args.out_dir, args.resume)
        if ckpt is None:
            raise tg.UserError(f"no checkpoint in '{args.out_dir}'; pass --resume PATH or the --out_dir of a run")
        return tg.model_from_checkpoint(ckpt), path
    if args.init_from:
        return tg.GPT.from_pretrained(args.init_from).eval(), args.init_from
    raise tg.UserError("which model? pass --resume CKPT (or --resume auto with --out_dir) or --init_from NAME_OR_DIR")


def sample(args: argparse.Namespace) -> None:
    """A timed sample; with --int8, the same from int8_copy, its speed-up and its validation loss."""
    device = tg.resolve_device(args.device, 0)
    dtype = tg.resolve_dtype(args.dtype, device)
    if args.int8 and device.type != "cpu":
        raise tg.UserError("--int8 sampling uses a CPU kernel; add --device cpu")
    val_stream = None
    if args.int8:
        try:
            val_stream = tg.TokenStream(args.data_dir, "val")
        except tg.UserError as e:
            print(f"no validation loss for the int8 comparison: {e}")
    model, source = load_model(args)
    variants = [("full", model.to(device))] + ([("int8", int8_copy(model))] if args.int8 else [])
    amp_ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    enc = tg.get_tokenizer()
    prompt = torch.tensor([enc.encode_ordinary(args.prompt)], dtype=torch.long, device=device)
    speeds, losses = {}, {}
    for name, m in variants:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with amp_ctx:
            m.generate(prompt, 2, top_k=args.top_k)  # warm-up: first-call allocation and kernel selection
            t0 = time.perf_counter()
            out = m.generate(prompt, args.sample_tokens, top_k=args.top_k, generator=generator)
            tg.synchronize(device)
            speeds[name] = args.sample_tokens / (time.perf_counter() - t0)
        print(f"{name} ({source}): {speeds[name]:.1f} tok/s | {enc.decode(out[0].tolist())!r}")
        if val_stream is not None:
            seq_len = min(args.seq_len, model.config.block_size)
            loss, n = tg.evaluate_loss(m, val_stream, args.batch_size, seq_len, args.val_tokens, device, amp_ctx)
            print(f"{name}: val loss {loss:.4f} over {n:,} tokens")
            losses[name] = loss
    if args.int8:
        change = f", val loss {losses['int8'] - losses['full']:+.4f}" if losses else ""
        print(f"int8 vs full: {speeds['int8'] / speeds['full']:.2f}x tokens/s{change}")


def build_parser() -> argparse.ArgumentParser:
    p = tg.build_parser("Sample from a train_gpt2.py checkpoint or Hugging Face weights, with its tokens/s.",
                        names=SHARED_FLAGS, helps=HELPS)
    p.add_argument("--int8", action="store_true",
                   help="on CPU: also sample from an int8 copy of the linear layers, and report its speed-up and "
                        "validation-loss change on --data_dir")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sample(args)
    except tg.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
