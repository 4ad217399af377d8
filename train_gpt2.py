"""
Pretrain GPT-2 (124M ... 1.5B, plus small CPU presets) from uint16 token shards.

One file holding what a training run executes, read top to bottom (each section uses only those above it):
  config -> kernels -> model -> data -> optimizer/schedule -> evaluation -> checkpoint -> train loop -> CLI
The other commands are scripts beside it that import it: sample.py, export_hf.py, hellaswag_eval.py, benchmarks/.

  python train_gpt2.py --model d6 --data_dir data/gutenberg           # one CPU or one GPU
  torchrun --standalone --nproc_per_node 8 train_gpt2.py --model gpt2   # DDP on one node
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BPE_RANKS_PATH = os.path.join(HERE, "data", "gpt2.tiktoken")
EOT_TOKEN = 50256  # <|endoftext|>: prefixed to every document
GPT2_VOCAB_SIZE = 50257
DEFAULT_MAX_STEPS = 19073  # 10B tokens at 524,288 tokens a step: one pass over FineWeb-Edu's 10B sample


class UserError(Exception):
    """A problem with the user's input: reported as one line and a non-zero exit, never a traceback."""


@contextmanager
def atomic_write(path: str, mode: str = "wb", verify=None):
    """A file that appears at `path` only once it is complete and on disk (temporary name, fsync, rename): a crash
    or a full disk leaves the previous file, never half of a new one. verify(tmp_path), if given, may raise to keep
    a bad file from replacing a good one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_master() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_master():
        print(*args, **kwargs, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but this torch sees no CUDA GPU; use --device cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware. A CPU without AVX512-BF16 or AMX emulates them far slower than fp32."""
    if device.type == "cuda":
        # Ampere (compute capability 8.0) and later, or ROCm. By default is_bf16_supported() also says yes where
        # bf16 is only emulated (V100, T4): slow matmuls and SDPA's math kernel, where fp16 runs on tensor cores.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    try:  # MPS has bf16 only on recent macOS; a tiny matmul is the reliable test
        with torch.autocast(device.type, dtype=torch.bfloat16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        return True
    except RuntimeError:
        return False


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively, else fp32: the precision of Muon's iterations."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware has it (recent GPUs and CPUs), else fp16 on CUDA (with a GradScaler), else fp32."""
    if name == "auto":
        name = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    elif name == "bf16" and not native_bf16(device):
        if device.type == "cpu":
            print0("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and much slower than "
                   "fp32")
        elif device.type == "cuda":
            print0("warning: this GPU has no native bf16 (compute capability 8.0 or later): bf16 is emulated and much "
                   "slower than --dtype fp16, which --dtype auto picks here")
        else:
            raise UserError(f"--dtype bf16 is not supported on this {device.type} device; use --dtype fp16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_compile(flag: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile as given; unset, on for CUDA only (on a CPU the compile time rarely pays back in a
    short run)."""
    return device.type == "cuda" if flag is None else flag


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding (or RoPE table) covers
    vocab_size: int = GPT2_VOCAB_SIZE  # real token ids; ids at or above it are never predicted
    padded_vocab_size: int = 50304  # 50257 rounded up to a multiple of 128: faster matmuls on every device
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # key/value heads, each shared by n_head // n_kv_head query heads; None = n_head
    norm: str = "layernorm"  # or "rmsnorm"
    pos: str = "learned"  # or "rope": rotary position embedding on queries and keys
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # or "swiglu", or "relu2": relu(x)^2
    mlp_hidden: int | None = None  # None = 4 * n_embd for gelu and relu2, 8/3 * n_embd rounded up to 64 for swiglu
    bias: bool = True  # biases in every Linear and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares the token embedding's matrix
    # speedrun options (all off = GPT-2 as released)
    qk_norm: bool = False  # RMSNorm (with a learned gain) on each head's queries and keys, before RoPE
    embed_norm: bool = False  # normalise the token embedding before the first block
    x0_lambdas: bool = False  # learned per-layer mix x = a_i * x + b_i * x0 of the residual and the embedding
    zero_init: bool = False  # output projections (and an untied head) start at zero
    logit_softcap: float = 0.0  # logits become C * tanh(logits / C); 0 = off

    def __post_init__(self):
        # resolved here, so a saved config states the sizes it was trained with
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            # swiglu has three matrices, not two: 8/3 keeps its parameters and FLOPs equal to a 4x gelu MLP
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# GPT-2 sizes as released, and small presets where the width follows the depth (64 per layer, heads of 64)
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    **{f"d{d}": dict(n_layer=d, n_head=d, n_embd=64 * d) for d in (2, 4, 6, 8, 12)},
}


# Named sets of flags. "flags" are set unless the command line gives them; "width_scaled" learning rates are quoted
# for width 768 and scale by 1/sqrt(n_embd / 768), as AdamW's stable LR shrinks with width (nanochat's rule);
# "fractions" are step counts as fractions of --max_steps, so the recipe fits any run length.
RECIPES: dict[str, dict] = {
    "speedrun": {
        "flags": dict(norm="rmsnorm", pos="rope", mlp="relu2", bias=False, qk_norm=True, embed_norm=True,
                      x0_lambdas=True, zero_init=True, untie=True,
                      optimizer="normuon", muon_lr=0.03, muon_momentum=0.95, muon_weight_decay=0.0,
                      embed_lr=0.3, head_lr=0.008, scalar_lr=0.04, adam_beta1=0.8, weight_decay=0.0,
                      lr_schedule="wsd", cooldown_frac=0.5, min_lr_ratio=0.0, shuffle=True, bos_aligned=True),
        "width_scaled": ("embed_lr", "head_lr"),
        "fractions": dict(warmup_steps=0.02, muon_momentum_warmup=0.3),
    },
}


def flag_text(name: str, value: Any) -> str:
    """The command-line words that set flag `name` to `value`: --x / --no-x for a switch, floats exactly."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name}"
    return f"--{name} {shlex.quote(repr(value) if isinstance(value, float) else str(value))}"


def flag(default: Any, help: str, **argparse_options) -> Any:
    """A Settings field that is also the command-line flag --<name>: its default, its help and any argparse options
    (choices, metavar)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass(frozen=True)
class Settings:
    """Everything a training run is told: one field per command-line flag, resolved once (resolve_settings: the
    recipe's values, the run's length in steps, every check) and never changed afterwards. FIXED_BY_CHECKPOINT
    names the fields a resumed run must repeat; the rest may change at any restart."""

    # model
    model: str = flag("gpt2", f"size preset: {', '.join(PRESETS)}")
    n_layer: int | None = flag(None, "override the preset's number of transformer blocks")
    n_head: int | None = flag(None, "override the preset's number of attention heads")
    n_embd: int | None = flag(None, "override the preset's width (residual stream size)")
    block_size: int | None = flag(None, "override the longest context (1024 in all presets)")
    norm: str | None = flag(None, "normalisation layer (default layernorm)", choices=["layernorm", "rmsnorm"])
    pos: str | None = flag(None, "GPT-2's learned positions or rotary embeddings (default learned)",
                           choices=["learned", "rope"])
    rope_theta: float | None = flag(None, "RoPE base wavelength (default 10000)")
    n_kv_head: int | None = flag(None, "key/value heads (grouped-query attention); divides n_head (default n_head)")
    mlp: str | None = flag(None, "GPT-2's tanh-GELU, SwiGLU, or relu(x)^2 (default gelu)",
                           choices=["gelu", "swiglu", "relu2"])
    mlp_hidden: int | None = flag(None, "MLP hidden size (default 4*n_embd; 8/3*n_embd, rounded up to 64, for swiglu)")
    qk_norm: bool | None = flag(None, "RMSNorm with a learned gain on each head's queries and keys (default off)")
    embed_norm: bool | None = flag(None, "normalise the token embedding before the first block (default off)")
    x0_lambdas: bool | None = flag(None, "learned per-layer mix of the token embedding into each block (default off)")
    zero_init: bool | None = flag(None, "residual output projections (and an untied head) start at zero (default off)")
    logit_softcap: float | None = flag(None, "cap the logits smoothly to +-C with C*tanh(z/C) (default 0 = off)")
    bias: bool | None = flag(None, "biases in linear and LayerNorm layers (default on)")
    untie: bool = flag(False, "give lm_head its own matrix instead of the token embedding's")
    dropout: float = flag(0.0, "dropout on embeddings, attention and residual branches")
    init_from: str | None = flag(None, "start from Hugging Face weights (gpt2, ... or a local GPT-2/Llama directory), "
                                       "architecture included", metavar="NAME_OR_DIR")
    # data
    data_dir: str = flag("data/edu_fineweb10B", "folder of *train* and *val* shards (.bin, or .npy)")
    seq_len: int = flag(1024, "tokens per training sequence (T)")
    batch_size: int = flag(64, "sequences per micro-batch per rank (B)")
    total_batch_size: int = flag(524288, "tokens per optimizer step over all ranks; gradient accumulation makes up "
                                         "the rest")
    bos_aligned: bool = flag(False, "start every training row at a document's <|endoftext|> (long documents are cut "
                                    "into row-sized pieces)")
    shuffle: bool = flag(False, "read the training rows in a permutation seeded by --seed and the epoch")
    # optimization
    max_steps: int | None = flag(None, f"optimizer steps; the LR schedule ends here (default {DEFAULT_MAX_STEPS}: "
                                       "10B tokens at 0.5M a step)")
    epochs: float | None = flag(None, "set --max_steps from passes over the training tokens instead")
    recipe: str | None = flag(None, "speedrun: the measured-best architecture, optimizer, schedule and data options "
                                    "for few tokens; flags given explicitly win", choices=list(RECIPES))
    optimizer: str = flag("adamw", "muon / normuon: (Nor)Muon on the blocks' matrices, AdamW on the rest",
                          choices=["adamw", "sgd", "muon", "normuon"])
    lr: float = flag(6e-4, "peak learning rate of AdamW/SGD (or Muon's AdamW part)")
    embed_lr: float | None = flag(None, "with muon/normuon: peak AdamW LR of the token embedding (default --lr)")
    head_lr: float | None = flag(None, "with muon/normuon: peak AdamW LR of an untied lm_head (default --lr)")
    scalar_lr: float | None = flag(None, "with muon/normuon: peak AdamW LR of gains, biases, scalars (default --lr)")
    adam_beta1: float = flag(0.9, "AdamW's first-moment decay (beta2 is 0.95)")
    muon_lr: float = flag(0.02, "peak learning rate of Muon's matrices")
    muon_momentum: float = flag(0.95, "Muon's (Nesterov) momentum")
    muon_momentum_warmup: int = flag(0, "steps over which Muon's momentum rises from 0.85 (0 = none)")
    muon_weight_decay: float = flag(0.0, "Muon's decoupled weight decay on its matrices (cautious with normuon)")
    normuon_beta2: float = flag(0.95, "NorMuon's decay of each neuron's running mean square update")
    sgd_momentum: float = flag(0.9, "SGD's Nesterov momentum (0 = plain SGD)")
    min_lr_ratio: float = flag(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = flag(715, "steps of linear learning-rate warmup")
    lr_schedule: str = flag("cosine", "after warmup: cosine to the floor, or wsd: flat, then linear down",
                            choices=["cosine", "wsd"])
    cooldown_frac: float = flag(0.4, "with --lr_schedule wsd: the fraction of --max_steps the linear decay takes")
    weight_decay: float = flag(0.1, "AdamW decay on matrices and embeddings")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = flag(1337, "seed of the init, the shuffle and the samples: runs are repeatable")
    # system
    device: str = flag("auto", "auto picks cuda, then mps, then cpu", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = flag("auto", "autocast precision; auto = bf16 where native, else fp16 (with a GradScaler) on CUDA",
                      choices=["auto", "bf16", "fp16", "fp32"])
    fsdp: bool = flag(False, "under torchrun, shard parameters, gradients and optimizer state over the ranks (FSDP2) "
                             "instead of replicating them (DDP)")
    chunked_loss: bool = flag(True, "compute the head and cross-entropy a chunk of positions at a time, never holding "
                                    "all the fp32 logits (the same loss and gradients)")
    activation_checkpointing: bool = flag(False, "recompute each block in backward: less memory, ~1/3 more compute")
    compile: bool | None = flag(None, "torch.compile the model (default: on for CUDA, off otherwise)")
    peak_tflops: float | None = flag(None, "device peak TFLOP/s for MFU (default: a GPU table, or a CPU matmul probe)")
    dist_timeout: float = flag(30.0, "minutes a rank waits in a collective before the run fails (torchrun): long "
                                     "enough for rank 0 to write a big checkpoint")
    # evaluation and sampling
    val_every: int = flag(250, "validation loss every N steps (0 = never)")
    val_tokens: int = flag(10_485_760, "validation tokens: the same sequences whatever the batch or world size")
    hellaswag_every: int = flag(0, "HellaSwag accuracy every N steps (0 = never)")
    hellaswag_limit: int | None = flag(None, "evaluate only the first N HellaSwag examples")
    hellaswag_file: str | None = flag(None, "HellaSwag val jsonl (default: where `hellaswag_eval.py --download` puts "
                                            "it)")
    sample_every: int = flag(1000, "print a sample every N steps (0 = never)")
    prompt: str = flag("Hello, I'm a language model,", "text the samples continue")
    sample_tokens: int = flag(32, "tokens per sample")
    top_k: int = flag(50, "sample from the k most likely tokens")
    tensorboard: bool = flag(False, "also write log.jsonl's records as TensorBoard scalars under OUT_DIR/tensorboard")
    wandb: str | None = flag(None, "also log log.jsonl's records to this W&B project (WANDB_MODE=offline works)",
                             metavar="PROJECT")
    # checkpoints
    out_dir: str = flag("out", "checkpoints (ckpt_<step>.pt) and log.jsonl go here")
    save_every: int = flag(1000, "checkpoint every N steps (0 = only the final one)")
    resume: str | None = flag(None, "'auto': the newest checkpoint in --out_dir (or a fresh start); or a .pt path")
    keep_last: int = flag(0, "keep only the newest K checkpoints (0 = keep all)")
    max_bad_steps: int = flag(5, "stop after this many steps in a row with a non-finite loss or gradient norm")
    stop_at_step: int | None = flag(None, "save and stop after this step, the LR schedule unchanged (time limits)")
    # not a flag: the flags the command line gave itself, which a recipe leaves alone
    explicit: tuple[str, ...] = ()

    def micro_steps(self, world_size: int) -> int:
        """Gradient-accumulation steps per optimizer step."""
        return self.total_batch_size // (self.batch_size * self.seq_len * world_size)

    def as_flags(self) -> str:
        """The settings that differ from the defaults, as the command line that gives them (floats exactly)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if "help" in f.metadata and value != f.default:
                parts.append(flag_text(f.name, value))
        return " ".join(parts)


# The flags --help shows under each heading, from the field that opens it
FLAG_GROUPS = {"model": "model", "data_dir": "data", "max_steps": "optimization", "device": "system",
               "val_every": "evaluation and sampling", "out_dir": "checkpoints"}
# What a checkpoint fixes, which a resumed run must repeat: the model's shape (checked on its GPTConfig, dropout
# aside) and these; --recipe, left out, comes from the checkpoint. A restart may change everything else: world size,
# micro-batch, device and dtype, evaluation, and the run's length (a run can be extended).
FIXED_BY_CHECKPOINT = ("recipe", "optimizer", "lr", "embed_lr", "head_lr", "scalar_lr", "adam_beta1", "muon_lr",
                       "muon_momentum", "muon_weight_decay", "normuon_beta2", "sgd_momentum", "weight_decay",
                       "grad_clip", "min_lr_ratio", "lr_schedule", "cooldown_frac", "seq_len", "total_batch_size",
                       "bos_aligned", "shuffle", "seed")


def recipe_values(name: str, values: dict, explicit: tuple[str, ...]) -> dict:
    """The flags --recipe NAME sets, for those the command line (explicit) leaves out; fractions wait for the run's
    length (recipe_fractions)."""
    recipe = RECIPES[name]
    width = values["n_embd"] or PRESETS.get(values["model"], PRESETS["gpt2"])["n_embd"]
    return {flag: value * (width / 768) ** -0.5 if flag in recipe["width_scaled"] else value
            for flag, value in recipe["flags"].items() if flag not in explicit}


def recipe_fractions(name: str, max_steps: int, explicit: tuple[str, ...]) -> dict:
    """The step counts --recipe NAME gives as fractions of the run, for a run of max_steps."""
    return {flag: round(fraction * max_steps) for flag, fraction in RECIPES[name]["fractions"].items()
            if flag not in explicit}


def model_config(preset: str, **overrides) -> GPTConfig:
    """The GPTConfig of a preset, with every non-None override (any GPTConfig field) applied and checked."""
    if preset not in PRESETS:
        raise UserError(f"unknown --model '{preset}'; choose one of: {', '.join(PRESETS)}")
    config = GPTConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    check_config(config)
    return config


def check_config(config: GPTConfig) -> None:
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} is not divisible by --n_head {config.n_head}")
    if config.n_kv_head < 1 or config.n_head % config.n_kv_head:
        raise UserError(f"--n_kv_head {config.n_kv_head} must divide --n_head {config.n_head} (1 = multi-query)")
    if config.pos == "rope" and config.head_dim % 2:
        raise UserError(f"--pos rope rotates pairs of dimensions: the head size {config.head_dim} must be even")
    if not config.rope_theta > 0 or math.isinf(config.rope_theta):
        raise UserError(f"--rope_theta must be a positive number, got {config.rope_theta}")
    if config.mlp_hidden < 1:
        raise UserError(f"--mlp_hidden must be positive, got {config.mlp_hidden}")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {config.dropout}")
    if not 0.0 <= config.logit_softcap < math.inf:
        raise UserError(f"--logit_softcap must be 0 (off) or a positive number, got {config.logit_softcap}")


# ----------------------------------------------------------------------------------------------------------------
# kernels: the forms the model takes where they are faster than the obvious ones. A CPU under torch.compile gets
# an explicit attention and a sigmoid-form GELU; every device gets the chunked head + cross-entropy, which never
# holds all the logits. Each is tested against the plain form it replaces.


# On a CPU, PyTorch's flash-attention kernel is built for long sequences. Up to this many positions the explicit
# softmax(QK^T)V is faster once Inductor fuses its mask, softmax and dropout around two batched matmuls; beyond it
# flash is, and its memory does not grow with T^2 (docs/kernels.md has the timings).
CPU_EXPLICIT_ATTENTION_MAX_LEN = 512


def compiling_for_cpu(device: torch.device) -> bool:
    """Whether this forward is being traced for Inductor's C++ kernels: where the model's CPU forms pay (eagerly each
    op of them is a pass over memory, and a GPU's kernels need no help)."""
    return device.type == "cpu" and torch.compiler.is_compiling()


def explicit_attention_is_faster(device: torch.device, seq_len: int) -> bool:
    """Whether explicit_attention beats SDPA here: compiled for a CPU, for short sequences only."""
    return seq_len <= CPU_EXPLICIT_ATTENTION_MAX_LEN and compiling_for_cpu(device)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal softmax(QK^T / sqrt(head_dim))V spelled out, with the softmax in fp32 as SDPA computes it; the new
    positions (the last T of the S keys) each see the keys up to themselves."""
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.size(-1)))
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    weights = torch.where(allowed, scores, float("-inf")).softmax(dim=-1)
    return F.dropout(weights, dropout_p).to(v.dtype) @ v


def gelu_tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written as x sigmoid(2u): the same
    function (1 + tanh(u) = 2 sigmoid(2u)), for Inductor's C++ kernels, which compute an exp several times faster
    than a tanh. Eagerly F.gelu's one kernel beats these separate passes, and a GPU's tanh is cheap."""
    z = x.float()
    return (z * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (z + 0.044715 * z * z * z))).to(x.dtype)


# positions per chunk: 200 MB of fp32 logits at GPT-2's vocabulary, enough rows for fast matmuls
LOSS_CHUNK_ROWS = 1024
# A CPU has memory to spare and a last-level cache of hundreds of MB: fewer, larger chunks are faster there
LOSS_CHUNK_ROWS_CPU = 2048


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(z / cap) in fp32: logits bounded by +-cap, so none can run away early in training (Gemma 2; the
    GPT-2 speedrun and nanochat use 15-30). Identity for small z, so it changes little once the model is good."""
    return cap * torch.tanh(z.float() / cap)


# Rows of a chunk the eager softmax holds in fp32 at once: 26 MB at GPT-2's vocabulary, small enough to stay in a
# CPU's cache and in the allocator's heap between blocks, where a whole chunk's fp32 copy (412 MB at 2,048 rows) is
# fresh pages every step
SOFTMAX_BLOCK_ROWS = 128


def xent_chunk(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, vocab_size: int,
               cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's loss, sum(scale * cross-entropy) of softcap(logits) with the padding ids (vocab_size on) at -inf,
    and its gradient w.r.t. the logits, written over `logits` (which the caller drops) in its dtype. Eagerly each op
    is a pass over memory, so on a CPU the chunk goes SOFTMAX_BLOCK_ROWS rows at a time, each in cache."""
    loss = torch.zeros((), dtype=torch.float32, device=logits.device)
    block = SOFTMAX_BLOCK_ROWS if logits.device.type == "cpu" else logits.size(0)  # a GPU's allocator caches
    for start in range(0, logits.size(0), block):
        rows = slice(start, start + block)
        loss_b, grad_b = xent_block(logits[rows], targets[rows], scale[rows], vocab_size, cap)
        loss += loss_b
        logits[rows].copy_(grad_b)  # a no-op where the block was computed in place (fp32 logits, no cap)
    return loss, logits


def xent_block(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, vocab_size: int,
               cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """xent_chunk's loss and gradient for a few rows, in place on one fp32 copy of them, each exponential taken once
    (torch.logsumexp would allocate another copy for z - max and exponentiate it again for the softmax). Masking
    the padding columns touches only those."""
    z = logits.float()
    if cap:
        tanh = z.div_(cap).tanh_()
        z = tanh.mul(cap)  # a new tensor: tanh is kept for the gradient
    z[:, vocab_size:] = float("-inf")
    target = targets.clamp(min=0).unsqueeze(1)
    picked = z.gather(1, target).squeeze(1)
    top = z.amax(dim=-1, keepdim=True)
    grad = z.sub_(top).exp_()  # exp(z - max), in place of the logits
    total = grad.sum(dim=-1, keepdim=True)
    loss = ((top + total.log()).squeeze(1) - picked).mul(scale).sum()  # log-sum-exp minus the target's logit
    grad.mul_(scale.unsqueeze(1) / total)  # scale * softmax
    grad.scatter_add_(1, target, -scale.unsqueeze(1))
    if cap:
        grad = torch.ops.aten.tanh_backward(grad, tanh)  # grad * (1 - tanh^2), in one pass
    return loss, grad.to(logits.dtype)


def xent_chunk_traced(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, vocab_size: int,
                      cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """xent_chunk as pure expressions, for torch.compile: Inductor fuses them into one pass that reduces each row
    (max, sum of exponentials, in fp32) and one that writes the gradient in the logits' dtype, where the in-place
    chain would make it keep the fp32 intermediates. The padding mask is a comparison of column indices, not an added
    bias vector: on a CPU Inductor would fold `mm + bias` into an addmm that first copies the broadcast bias into the
    whole fp32 output."""
    z = logits.float()
    if cap:
        tanh = torch.tanh(z / cap)
        z = cap * tanh
    columns = torch.arange(z.size(1), device=z.device)
    z = torch.where(columns < vocab_size, z, float("-inf"))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = ((lse - z.gather(1, targets.clamp(min=0).unsqueeze(1))).squeeze(1) * scale).sum()
    onehot = targets.unsqueeze(1) == columns  # no column matches an ignored -1
    grad = (torch.exp(z - lse) - onehot.float()) * scale.unsqueeze(1)
    if cap:
        grad = grad * (1 - tanh * tanh)
    return loss, grad.to(logits.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the head's logits x @ weight.T against targets (-1 = ignored), `rows` positions
    at a time, so the (positions x vocabulary) fp32 logits never exist whole: only one chunk's, and only until its
    gradients are taken. Those come in the same pass, while the chunk's softmax is at hand (d logits = softmax -
    onehot); backward just scales them. Under autocast the matmuls run in the autocast dtype, the softmax in fp32.
    The padding ids, vocab_size and above, are at -inf. With cap > 0 the logits are softcap(x @ weight.T, cap), the
    padding masked after the cap, and the gradient picks up the cap's derivative 1 - tanh^2."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, vocab_size: int, targets: torch.Tensor, rows: int,
                with_grad: bool, cap: float = 0.0) -> torch.Tensor:
        # The chunks compute the sum over valid positions and its gradient; the mean's 1/N is applied to the loss
        # here and to the gradients in backward, in fp32, together with the loss scale that arrives there. Applied
        # before the head's matmuls, 1/N (1.5e-5 at 65,536 positions) would push softmax entries below fp16's
        # smallest subnormal and flush most of the head's gradient to zero under fp16 autocast.
        valid = targets != -1
        inv_n = 1.0 / valid.sum()  # a tensor, so no host sync
        counted = valid.float()  # each position's weight in the sum: 1, or 0 where ignored
        chunk = xent_chunk_traced if torch.compiler.is_compiling() else xent_chunk
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if with_grad else None
        grad_w = None
        ctx.weight_dtype = weight.dtype
        # the head in the matmul dtype once, not once per chunk
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = weight.to(dtype)
        for start in range(0, x.size(0), rows):
            xc = x[start:start + rows].to(dtype)
            # the mask is applied inside the kernel: as a matmul bias it would cost a copy of the whole chunk
            logits = F.linear(xc, weight)
            loss_c, grad = chunk(logits, targets[start:start + rows], counted[start:start + rows], vocab_size, cap)
            loss = loss + loss_c
            if with_grad:
                grad_x[start:start + rows] = grad @ weight
                grad_wc = (grad.t() @ xc).float()
                grad_w = grad_wc if grad_w is None else grad_w + grad_wc
        ctx.save_for_backward(grad_x, grad_w, inv_n)
        return loss * inv_n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w, inv_n = ctx.saved_tensors
        scale = grad_loss * inv_n
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None, None, None

# ----------------------------------------------------------------------------------------------------------------
# model: GPT-2 as released by default (pre-norm blocks, learned positions, biases, tied embeddings, HF-weight-
# compatible); the options make the Llama-style variant (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()  # no kernel launch at all in the usual p = 0 case


class Rotary(nn.Module):
    """RoPE tables: position t turns dimension pair (i, i + head_dim/2) by t * theta^(-2i/head_dim). The two halves
    of a head form the pairs (not adjacent dimensions), the layout Llama checkpoints use."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim / 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim) rotated by the (T, head_dim/2) angle tables, in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every position seen so far, per layer, so each generated token costs one position's
    work instead of the whole prefix's. Stores the n_kv_head heads, not the repeated ones: GQA's memory saving."""

    def __init__(self, config: GPTConfig, batch_size: int):
        self.shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.k: list[torch.Tensor | None] = [None] * config.n_layer
        self.v: list[torch.Tensor | None] = [None] * config.n_layer
        self.pos = 0  # positions filled, in every layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return those of all positions so far."""
        if self.k[layer] is None:  # allocated on first use, in the dtype autocast gives the keys
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q for all heads, then k and v for the key/value heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # QK-norm bounds every attention logit by |gain_q| * |gain_k| * sqrt(head_dim), so a high learning rate
        # cannot blow up the softmax; the learned gains (the layout of Qwen3 / OLMo 2) set its temperature
        self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-5) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-5) if config.qk_norm else None
        self.attn_dropout = config.dropout
        self.resid_dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        hd, kv = self.head_dim, self.n_kv_head
        q, k, v = self.c_attn(x).split([self.n_head * hd, kv * hd, kv * hd], dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, kv, hd).transpose(1, 2)
        v = v.view(B, T, kv, hd).transpose(1, 2)
        if self.q_norm is not None:  # gains cast to q's dtype: under autocast that keeps the fused kernel
            q = F.rms_norm(q, (hd,), self.q_norm.weight.to(q.dtype), self.q_norm.eps)
            k = F.rms_norm(k, (hd,), self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if kv != self.n_head:  # query head i reads key/value head i // (n_head / n_kv_head)
            k = k.repeat_interleave(self.n_head // kv, dim=1)
            v = v.repeat_interleave(self.n_head // kv, dim=1)
        S = k.size(2)
        mask = None
        if T > 1 and S > T:  # new tokens after cached ones: each sees the cache and the new tokens up to itself
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        dropout_p = self.attn_dropout if self.training else 0.0
        if cache is None and explicit_attention_is_faster(x.device, T):
            y = explicit_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and S == T, dropout_p=dropout_p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class ReLU2(nn.Module):
    """relu(x)^2 (So et al. 2021, Primer): sparse like ReLU, smooth at 0; trains faster than GELU per token in the
    GPT-2 speedrun and nanochat, at the same parameters and FLOPs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class TanhGELU(nn.Module):
    """GPT-2's tanh-approximate GELU; compiled for a CPU, its sigmoid form (gelu_tanh_via_sigmoid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_via_sigmoid(x) if compiling_for_cpu(x.device) else F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        # tanh-GELU is the approximation GPT-2 was trained with
        self.act = ReLU2() if config.mlp == "relu2" else TanhGELU()
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), projected back: the gate and up matrices are one c_fc matmul, gate first."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.chunked_loss = False  # with targets: ChunkedCrossEntropy, and no logits returned
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            drop=make_dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config),
        ))
        if config.embed_norm:
            self.transformer.ln_e = make_norm(config)
        if config.x0_lambdas:
            # nanochat's residual scalars: each block reads a_i * x + b_i * x0, so a layer can go back to the plain
            # token embedding; a = 1, b = 0 starts as the ordinary residual stream
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
            self.rotary = None
        else:
            self.rotary = Rotary(config.head_dim, config.block_size, config.rope_theta)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # one Parameter: counted, decayed and saved once
        # Added to the logits: -inf on the padding ids, so they are never sampled and carry no probability mass.
        # Non-persistent, so state dicts stay identical to GPT2LMHeadModel's.
        vocab_mask = torch.zeros(config.padded_vocab_size)
        vocab_mask[config.vocab_size:] = float("-inf")
        self.register_buffer("vocab_mask", vocab_mask, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream, which n_layer blocks add to twice
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init:
            # every block starts as the identity and the untied head predicts uniformly, so the first updates are
            # not spent undoing random outputs (the GPT-2 speedrun, nanochat); gradients still reach every weight
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or (name == "lm_head.weight" and not config.tie_embeddings):
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, exclude_padding: bool = True) -> int:
        """Parameters counted once (the tied embedding too); without the padding rows, as GPT-2 reports them."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_padding:
            padded_matrices = 1 if self.config.tie_embeddings else 2
            n -= padded_matrices * (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, padded_vocab_size) for every position; with targets, the mean cross-entropy over the
        targets that are not -1 (ignored positions), and with targets and self.chunked_loss only that loss (the
        logits are None: never materialised). With a cache, idx continues the tokens already in it."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if self.rotary is None:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = self.rotary(start, T)
        if self.config.embed_norm:
            x = self.transformer.ln_e(x)
        x = x0 = self.transformer.drop(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if self.config.x0_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, cache, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.chunked_loss:
            with_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
            rows = LOSS_CHUNK_ROWS_CPU if x.device.type == "cpu" else LOSS_CHUNK_ROWS
            loss = ChunkedCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, self.config.vocab_size,
                                             targets.reshape(B * T), rows, with_grad,
                                             self.config.logit_softcap)
            return None, loss
        logits = self.head(x)
        loss = None
        if targets is not None:
            # the softmax in fp32 whatever the autocast dtype: bf16 log-probabilities are too coarse for a loss
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final hidden states, softcapped if the config asks, with the padding ids at -inf."""
        cap = self.config.logit_softcap
        if not cap:  # the mask as the matmul's bias: no separate pass over the logits
            return F.linear(x, self.lm_head.weight, self.vocab_mask)
        return softcap(F.linear(x, self.lm_head.weight), cap) + self.vocab_mask

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); deterministic for a seeded generator. With the KV
        cache each step feeds one token; once the context is longer than block_size the window slides, which moves every
        position, so from then on each step recomputes the window, as without a cache."""
        block = self.config.block_size
        cache, new = None, idx
        for _ in range(max_new_tokens):
            if cache is None or cache.pos + new.size(1) > block:
                cache = KVCache(self.config, idx.size(0)) if use_cache else None
                new = idx[:, -block:]
            logits, _ = self(new, cache=cache)
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
            new = next_token if use_cache else idx
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float = 0.0) -> "GPT":
        """Weights from a Hugging Face GPT-2 (hub name gpt2, gpt2-medium, ... or a local directory) or from a Llama
        directory of the kind export_hf.py writes."""
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise UserError("loading Hugging Face weights needs transformers: pip install transformers") from None
        try:
            hf_config = AutoConfig.from_pretrained(name_or_dir)
            if hf_config.model_type not in ("gpt2", "llama"):
                raise UserError(f"'{name_or_dir}' is a {hf_config.model_type} model; only GPT-2 and Llama layouts load")
            hf = AutoModelForCausalLM.from_pretrained(name_or_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load '{name_or_dir}' as a Hugging Face model ({str(e).splitlines()[0]}); "
                            "without network access, pass a local directory saved by save_pretrained") from None
        config = config_from_hf(hf.config, name_or_dir, dropout)
        model = cls(config)
        hf_sd = hf.state_dict()
        ours = model.state_dict()
        with torch.no_grad():
            ours["transformer.wte.weight"].zero_()  # padding rows stay zero: masked out of every softmax anyway
            ours["lm_head.weight"].zero_()
            for hf_name, name, rows, transposed in hf_weight_map(config):
                w = hf_sd[hf_name].t() if transposed else hf_sd[hf_name]
                (ours[name] if rows is None else ours[name][rows]).copy_(w)
        return model


def hf_layout(config: GPTConfig) -> str:
    """The Hugging Face architecture that computes exactly what `config` does: 'gpt2' or 'llama' where one does
    (they load anywhere), else 'custom': this file's own model, shipped as code in the export (trust_remote_code)."""
    speedrun = config.qk_norm or config.embed_norm or config.x0_lambdas or config.logit_softcap or config.mlp == "relu2"
    if speedrun:
        return "custom"
    if (config.norm, config.pos, config.mlp, config.bias, config.n_kv_head) == (
            "layernorm", "learned", "gelu", True, config.n_head):
        return "gpt2"
    if (config.norm, config.pos, config.mlp, config.bias) == ("rmsnorm", "rope", "swiglu", False):
        return "llama"
    return "custom"


def hf_weight_map(config: GPTConfig) -> list[tuple[str, str, slice | None, bool]]:
    """(Hugging Face name, our name, our rows, transposed) for every exported tensor: one table for export and
    import. Rows cut the vocabulary back to its real size and split our fused matmuls (c_attn = q|k|v, swiglu
    c_fc = gate|up)."""
    vocab = slice(0, config.vocab_size)
    if hf_layout(config) == "gpt2":
        # HF GPT-2 keeps these as Conv1D, i.e. (in, out): transposed relative to nn.Linear
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        table = [("transformer.wte.weight", "transformer.wte.weight", vocab, False),
                 ("transformer.wpe.weight", "transformer.wpe.weight", None, False)]
        for i in range(config.n_layer):
            for leaf in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                         "mlp.c_proj.weight", "mlp.c_proj.bias"):
                name = f"transformer.h.{i}.{leaf}"
                table.append((name, name, None, leaf in conv1d))
        table += [("transformer.ln_f.weight", "transformer.ln_f.weight", None, False),
                  ("transformer.ln_f.bias", "transformer.ln_f.bias", None, False)]
    else:
        q, kv, hidden = config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.mlp_hidden
        table = [("model.embed_tokens.weight", "transformer.wte.weight", vocab, False)]
        for i in range(config.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            table += [
                (theirs + "input_layernorm.weight", ours + "ln_1.weight", None, False),
                (theirs + "self_attn.q_proj.weight", ours + "attn.c_attn.weight", slice(0, q), False),
                (theirs + "self_attn.k_proj.weight", ours + "attn.c_attn.weight", slice(q, q + kv), False),
                (theirs + "self_attn.v_proj.weight", ours + "attn.c_attn.weight", slice(q + kv, q + 2 * kv), False),
                (theirs + "self_attn.o_proj.weight", ours + "attn.c_proj.weight", None, False),
                (theirs + "post_attention_layernorm.weight", ours + "ln_2.weight", None, False),
                (theirs + "mlp.gate_proj.weight", ours + "mlp.c_fc.weight", slice(0, hidden), False),
                (theirs + "mlp.up_proj.weight", ours + "mlp.c_fc.weight", slice(hidden, 2 * hidden), False),
                (theirs + "mlp.down_proj.weight", ours + "mlp.c_proj.weight", None, False),
            ]
        table.append(("model.norm.weight", "transformer.ln_f.weight", None, False))
    if not config.tie_embeddings:
        table.append(("lm_head.weight", "lm_head.weight", vocab, False))
    return table


def config_from_hf(c, name: str, dropout: float) -> GPTConfig:
    """Our config for a Hugging Face GPT-2 or Llama config, refusing variants this model would compute differently."""
    padded = 128 * math.ceil(c.vocab_size / 128)
    tie = bool(getattr(c, "tie_word_embeddings", True))
    if c.model_type == "gpt2":
        checks = [
            (f"activation {c.activation_function}", c.activation_function in ("gelu_new", "gelu_pytorch_tanh")),
            (f"layer_norm_epsilon {c.layer_norm_epsilon}", c.layer_norm_epsilon == 1e-5),
            ("scale_attn_by_inverse_layer_idx", not c.scale_attn_by_inverse_layer_idx),
            ("reorder_and_upcast_attn", not c.reorder_and_upcast_attn),
        ]
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, padded_vocab_size=padded,
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, mlp_hidden=c.n_inner,
                           dropout=dropout, tie_embeddings=tie)
    else:
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        checks = [
            (f"activation {c.hidden_act}", c.hidden_act == "silu"),
            (f"rms_norm_eps {c.rms_norm_eps}", c.rms_norm_eps == 1e-5),
            (f"rope scaling {rope.get('rope_type')}", rope.get("rope_type", "default") == "default"),
            ("attention or MLP biases", not c.attention_bias and not getattr(c, "mlp_bias", False)),
            (f"head_dim {head_dim}", head_dim * c.num_attention_heads == c.hidden_size),
        ]
        config = GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, padded_vocab_size=padded,
                           n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                           n_kv_head=c.num_key_value_heads, norm="rmsnorm", pos="rope", rope_theta=float(theta),
                           mlp="swiglu", mlp_hidden=c.intermediate_size, bias=False, dropout=dropout,
                           tie_embeddings=tie)
    unsupported = [what for what, ok in checks if not ok]
    if unsupported:
        raise UserError(f"'{name}' is a {c.model_type} variant this model cannot represent: {', '.join(unsupported)}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# data: GPT-2 tokenizer; llm.c (*.bin) and build-nanogpt (*.npy) shards, read as one memory-mapped token stream


# GPT-2's own pre-tokenisation pattern: contractions, letters, numbers, punctuation, whitespace
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """GPT-2's BPE from the bundled ranks: ids identical to tiktoken's `gpt2`, with no download. Built once per
    process: parsing the 50k-line ranks file is not free."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    if not os.path.exists(BPE_RANKS_PATH):
        raise UserError(f"GPT-2 BPE ranks not found at {BPE_RANKS_PATH}; restore data/gpt2.tiktoken from the "
                        "repository")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(BPE_RANKS_PATH),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256  # the header is 256 int32: magic, version, token count, then zeros
HEADER_BYTES = HEADER_INTS * 4


def read_shard(path: str) -> np.ndarray:
    """Memory-map one shard's tokens as uint16, after checking its header against the file size."""
    if path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"shard {path} is not a readable .npy file ({e}); regenerate it") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"shard {path} holds {tokens.dtype} with shape {tokens.shape}; expected 1-D uint16 tokens")
        return tokens
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header; regenerate it "
                        "with prepare_fineweb.py")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise UserError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not an llm.c token shard; "
                        "regenerate it with prepare_fineweb.py")
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION} (uint16 GPT-2 tokens)")
    n_tokens = int(header[2])
    if size != HEADER_BYTES + 2 * n_tokens:
        raise UserError(f"shard {path} is truncated or padded: its header says {n_tokens} tokens but the file holds "
                        f"{(size - HEADER_BYTES) / 2:.0f}; regenerate it")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def find_shards(data_dir: str, split: str) -> list[str]:
    """The shards of one split ('train' or 'val'), by file name: *train*.bin / *val*.npy and so on."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory '{data_dir}' does not exist; create shards with "
                        "'python prepare_fineweb.py --sample' or point --data_dir at a folder of .bin/.npy shards")
    files = sorted(f for ext in ("bin", "npy") for f in glob.glob(os.path.join(data_dir, f"*{split}*.{ext}")))
    if not files:
        raise UserError(f"no '{split}' shards (*{split}*.bin or *{split}*.npy) in '{data_dir}'; "
                        "create them with 'python prepare_fineweb.py'")
    return files


class TokenStream:
    """All shards of a split as one sequence of tokens, memory-mapped: reads may cross shard boundaries."""

    def __init__(self, data_dir: str, split: str, vocab_size: int = GPT2_VOCAB_SIZE):
        self.files = find_shards(data_dir, split)
        self.shards = [read_shard(f) for f in self.files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, checked against the vocabulary."""
        out = np.empty(n, dtype=np.int64)
        done = 0
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < n:
            offset = start + done - int(self.starts[i])
            chunk = self.shards[i][offset: offset + n - done]
            out[done: done + len(chunk)] = chunk
            if len(chunk) and chunk.max() >= self.vocab_size:
                raise UserError(f"shard {self.files[i]} holds token id {int(chunk.max())}, outside the vocabulary "
                                f"of {self.vocab_size}; it was not made with the GPT-2 tokenizer")
            done += len(chunk)
            i += 1
        return out


def document_rows(stream: TokenStream, seq_len: int) -> np.ndarray:
    """Starts of (seq_len + 1)-token training rows that each begin at a document's <|endoftext|>, so no row opens
    in the middle of a text it cannot see the start of. A row is packed: a short document is followed by the next
    ones. The next row starts at the first document start at or after the previous row's end; the tokens in between
    are skipped. A document longer than a row is cut into seq_len-token pieces that start rows of their own, so
    nothing of a long text is lost."""
    starts = np.concatenate([np.flatnonzero(np.asarray(shard) == EOT_TOKEN) + offset
                             for shard, offset in zip(stream.shards, stream.starts)])
    if len(starts) == 0:
        raise UserError(f"--bos_aligned found no <|endoftext|> token in {stream.files[0]} and the other shards: "
                        "no document starts to align to; drop --bos_aligned")
    lengths = np.diff(np.append(starts, len(stream)))
    pieces = -(-lengths // seq_len)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    candidates = np.repeat(starts, pieces) + seq_len * (np.arange(len(first)) - first)
    following = np.searchsorted(candidates, candidates + seq_len)  # the first candidate past each row's end
    rows, i = [], 0
    while i < len(candidates) and candidates[i] + seq_len + 1 <= len(stream):
        rows.append(candidates[i])
        i = following[i]
    return np.array(rows, dtype=np.int64)


class ShardLoader:
    """Training batches from one split. Every micro-step, rank r of W reads the r-th of W adjacent (B*T + 1)-token
    windows at a position all ranks share, then all move on by W*B*T: ranks never overlap, every token is visited
    once an epoch (across shard boundaries), and all ranks wrap to the next epoch on the same step. The position is
    all the state there is, so it goes into checkpoints.

    bos_aligned or shuffle switch to a table of (T + 1)-token rows: document_rows, or every T-th position. A micro-step
    takes the next W*B entries of the epoch's order, rank r the r-th B of them; shuffle makes that order a permutation
    seeded by (seed, epoch), so shard order cannot show up as periodic loss. Every row is read once an epoch, by one
    rank; the position in the order and the epoch are again the whole state."""

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int = GPT2_VOCAB_SIZE, bos_aligned: bool = False, shuffle: bool = False, seed: int = 0):
        self.stream = TokenStream(data_dir, split, vocab_size)
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.stride = batch_size * seq_len * world_size
        if len(self.stream) < self.stride + 1:
            raise UserError(f"the '{split}' split in '{data_dir}' has {len(self.stream):,} tokens, fewer than one "
                            f"micro-batch over all ranks ({self.stride + 1:,}); lower --batch_size or --seq_len")
        self.rows = None
        if bos_aligned or shuffle:
            self.rows = (document_rows(self.stream, seq_len) if bos_aligned
                         else np.arange(0, len(self.stream) - seq_len, seq_len))
            if len(self.rows) < batch_size * world_size:
                raise UserError(f"--bos_aligned leaves {len(self.rows)} rows of {seq_len + 1} tokens in '{data_dir}', "
                                f"fewer than one micro-batch over all ranks ({batch_size * world_size}); "
                                "lower --batch_size or --seq_len, or drop --bos_aligned")
        self.shuffle, self.seed = shuffle, seed
        self._order_epoch, self._order = None, None
        self.position = 0
        self.epoch = 0

    def skipped_tokens(self) -> int:
        """Training tokens no row reads as input in an epoch (bos_aligned's gaps before document starts)."""
        return 0 if self.rows is None else len(self.stream) - 1 - self.T * len(self.rows)

    def order(self) -> np.ndarray:
        """This epoch's order of the rows."""
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(len(self.rows)) if self.shuffle else np.arange(len(self.rows))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is not None:
            return self._next_rows()
        if self.position + self.stride + 1 > len(self.stream):
            self.position, self.epoch = 0, self.epoch + 1
        buf = torch.from_numpy(self.stream.read(self.position + self.rank * self.B * self.T, self.B * self.T + 1))
        self.position += self.stride
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def _next_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        step_rows = self.B * self.world_size
        if self.position + step_rows > len(self.rows):
            self.position, self.epoch = 0, self.epoch + 1
        mine = self.order()[self.position + self.rank * self.B: self.position + (self.rank + 1) * self.B]
        buf = torch.from_numpy(np.stack([self.stream.read(int(start), self.T + 1) for start in self.rows[mine]]))
        self.position += step_rows
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # the strides of the other path: no recompile

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


# ----------------------------------------------------------------------------------------------------------------
# optimizer and learning-rate schedule


def decay_groups(params: list[nn.Parameter], weight_decay: float, lr_flag: str) -> list[dict]:
    """Decay matrices and embeddings (>= 2-D), not biases and norm gains. lr_flag names the CLI flag that sets the
    group's peak learning rate, so the schedule can scale each optimiser's groups from their own flag."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_flag": lr_flag},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_flag": lr_flag}]
    return [g for g in groups if g["params"]]


def adamw(params: list[nn.Parameter] | list[dict], lr: float, weight_decay: float, device_type: str,
          betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over decay_groups of params (or over the given param groups), fused where this torch supports the
    device, and it says so where not; fused=False gives the plain for-loop implementation (the benchmark's baseline)."""
    groups = params if params and isinstance(params[0], dict) else decay_groups(params, weight_decay, "lr")
    if not fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError) as e:
        print0(f"fused AdamW is not available on {device_type} ({e}); using the foreach implementation")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


# Newton-Schulz: one fixed quintic a*X + b*(XX^T)X + c*(XX^T)^2 X, its slope at 0 made as steep as possible (Keller
# Jordan's Muon, torch.optim.Muon), applied 5 times.
NEWTON_SCHULZ = [(3.4445, -4.7750, 2.0315)] * 5
# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932, computed there for 5 iterations with safety
# factor 2e-2 and cushion 2): each iteration's quintic is the minimax-optimal one for the singular values the
# iterations before it leave, so 5 iterations end closer to 1 across the whole spectrum than 5 of the fixed quintic.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(g: torch.Tensor, coefficients: list[tuple[float, float, float]], dtype: torch.dtype) -> torch.Tensor:
    """U V^T of g = U S V^T, approximately: odd matrix polynomials push every singular value towards 1. Run on the
    wide orientation, where X X^T is the smaller Gram matrix. g is one matrix or a stack of same-shaped ones."""
    x = g.to(dtype)
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    # Frobenius >= spectral norm: every singular value now lies in [0, 1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in coefficients:
        gram = x @ x.mT
        # a x + (b gram + c gram^2) x as two baddbmm: the scalings ride on the matmuls instead of passes of their own
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x[0] if single else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): SGD momentum whose update, per weight matrix, is replaced by its nearest
    semi-orthogonal matrix, so every direction of the matrix moves at the same rate. The learning rate is scaled by
    sqrt(max(1, rows / cols)), torch.optim.Muon's "original" rule.

    normuon=True is NorMuon (Li et al. 2025, arXiv:2510.05491): after orthogonalisation each neuron's update is
    divided by the root of its own running mean square (beta2), then the whole update is rescaled to its former
    norm, so no neuron's updates dominate; it iterates with Polar Express and uses cautious weight decay (decay only
    the entries the update moves the same way: Chen et al. 2025), as the GPT-2 speedrun does. ortho_dtype is the
    iterations' precision: bf16 where the hardware has it, fp32 elsewhere (emulated bf16 is far slower)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, normuon: bool = False,
                 beta2: float = 0.95, ortho_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, normuon=normuon,
                                      beta2=beta2, nesterov=True))
        self.ortho_dtype = ortho_dtype

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            normuon = group.get("normuon", False)  # absent in the groups of torch.optim.Muon checkpoints
            by_shape: dict[torch.Size, list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for params in by_shape.values():
                # One batched iteration per shape (every layer's c_fc at once): fewer, larger matmuls than matrix by
                # matrix, and the same numbers, since each matrix is still normalised and iterated alone
                updates = torch.stack([self._nesterov(p, group["momentum"]) for p in params])
                updates = orthogonalize(updates, POLAR_EXPRESS if normuon else NEWTON_SCHULZ, self.ortho_dtype)
                for p, update in zip(params, updates):
                    self._apply(p, update.to(p.dtype), group, normuon)

    def _nesterov(self, p: nn.Parameter, momentum: float) -> torch.Tensor:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        return p.grad.lerp(buf, momentum)

    def _apply(self, p: nn.Parameter, update: torch.Tensor, group: dict, normuon: bool) -> None:
        lr, decay = group["lr"], group["weight_decay"]
        if normuon:
            update = self._normalize_neurons(update, self.state[p], group["beta2"])
            if decay:
                p.sub_(p * (update * p >= 0), alpha=lr * decay)
        elif decay:
            p.mul_(1 - lr * decay)
        p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    @staticmethod
    def _normalize_neurons(update: torch.Tensor, state: dict, beta2: float) -> torch.Tensor:
        # A semi-orthogonal wide matrix has rows of norm 1 already; its columns (a tall one's rows) are what vary
        dim = 1 if update.size(0) >= update.size(1) else 0
        mean_sq = update.square().mean(dim=dim, keepdim=True)
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros_like(mean_sq)
        v = state["second_moment"]
        v.lerp_(mean_sq, 1 - beta2)
        scaled = update / (v.sqrt() + 1e-10)
        return (scaled * (update.norm() / scaled.norm().clamp(min=1e-10))).to(update.dtype)


def adam_groups(params: list[nn.Parameter], model: nn.Module, s: Settings) -> list[dict]:
    """The AdamW part beside Muon: the token embedding (--embed_lr), an untied head (--head_lr) and the vector
    parameters (--scalar_lr) each at their own peak LR when the flag is given, else all at --lr."""
    kinds = {id(model.transformer.wte.weight): "embed_lr"}
    if not model.config.tie_embeddings:
        kinds[id(model.lm_head.weight)] = "head_lr"
    flag_of = {}
    for p in params:
        flag = kinds.get(id(p), "scalar_lr" if p.dim() < 2 else "lr")
        flag_of[id(p)] = flag if getattr(s, flag) is not None else "lr"
    groups = []
    for flag in dict.fromkeys(flag_of.values()):  # without the flags: one "lr" bucket, the layout of older runs
        groups += decay_groups([p for p in params if flag_of[id(p)] == flag], s.weight_decay, flag)
    for g in groups:
        g["lr"] = getattr(s, g["lr_flag"])
    return groups


def configure_optimizers(model: nn.Module, s: Settings, device_type: str,
                         ortho_dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """The optimisers of --optimizer: adamw or sgd over every parameter, or muon / normuon for the 2-D matrices
    inside the blocks plus AdamW for embeddings, lm_head, norms and biases, which orthogonalised updates do not suit.
    Every group carries lr_flag; the LR schedule multiplies that flag's value."""
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (s.adam_beta1, 0.95)
    if s.optimizer == "adamw":
        return [adamw(params, s.lr, s.weight_decay, device_type, betas=betas)]
    if s.optimizer == "sgd":
        return [torch.optim.SGD(decay_groups(params, s.weight_decay, "lr"), lr=s.lr, momentum=s.sgd_momentum,
                                nesterov=s.sgd_momentum > 0)]
    hidden = [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    hidden_ids = {id(p) for p in hidden}
    muon = Muon([{"params": hidden, "lr_flag": "muon_lr"}], lr=s.muon_lr, momentum=s.muon_momentum,
                weight_decay=s.muon_weight_decay, normuon=s.optimizer == "normuon", beta2=s.normuon_beta2,
                ortho_dtype=ortho_dtype)
    rest = adam_groups([p for p in params if id(p) not in hidden_ids], model, s)
    return [muon, adamw(rest, s.lr, s.weight_decay, device_type, betas=betas)]


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
          schedule: str = "cosine", cooldown_frac: float = 0.0) -> float:
    """Linear warmup from max_lr/warmup_steps (never 0: step 0 must learn), then down to min_lr_ratio*max_lr at
    max_steps, and flat after. cosine: a half cosine over all the steps after warmup. wsd (warmup-stable-decay):
    flat at max_lr, then a straight line down over the last cooldown_frac of max_steps: the flat phase learns fastest,
    the cooldown collects the gain, and the run's length can be set late."""
    min_lr = max_lr * min_lr_ratio
    if step >= max_steps:
        return min_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "wsd":
        cooldown = max(1, round(cooldown_frac * max_steps))
        return min_lr + (max_lr - min_lr) * min(1.0, (max_steps - step) / cooldown)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def muon_momentum_at(step: int, momentum: float, warmup_steps: int) -> float:
    """Muon's momentum rises linearly from 0.85 to --muon_momentum over the first warmup_steps: early gradients
    change fast, and a long momentum average would point where the loss used to be (the GPT-2 speedrun)."""
    if step >= warmup_steps:
        return momentum
    return 0.85 + (momentum - 0.85) * step / warmup_steps


# ----------------------------------------------------------------------------------------------------------------
# evaluation: validation loss, samples, HellaSwag, model FLOPs utilisation, timing of training steps

# Dense tensor-core peaks in TFLOP/s from the vendor's data sheets: (model, variant, bf16/fp16, fp32). A model and
# a variant each match a whole word of the device name ("NVIDIA H100 PCIe", "Tesla V100-SXM2-16GB"), so "L4" is not
# an L40's peak; the first row that matches wins, so a variant comes before its model's generic row. fp32 runs use
# TF32 on Ampere and later; V100 and T4 have no TF32, so their fp32 peak is the plain FP32 rate.
GPU_PEAK_TFLOPS = [
    ("H100", "PCIe", 756.0, 378.0), ("H100", "NVL", 835.0, 418.0), ("H100", None, 989.0, 495.0),
    ("H200", None, 989.0, 495.0), ("A100", None, 312.0, 156.0), ("L40S", None, 362.0, 183.0),
    ("L40", None, 181.0, 90.5), ("L4", None, 121.0, 60.0), ("A6000", None, 155.0, 77.0), ("4090", None, 165.0, 83.0),
    ("3090", None, 71.0, 36.0), ("A10G", None, 70.0, 35.0), ("V100", None, 125.0, 15.7), ("T4", None, 65.0, 8.1),
]


def gpu_peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The table's peak for a device name in this dtype, or None for a device it does not know."""
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", name)}
    for model, variant, low_precision, fp32 in GPU_PEAK_TFLOPS:
        if model.lower() in words and (variant is None or variant.lower() in words):
            return fp32 if dtype == torch.float32 else low_precision
    return None


@torch.no_grad()
def evaluate_loss(model: nn.Module, stream: TokenStream, batch_size: int, seq_len: int, max_tokens: int,
                  device: torch.device, amp_ctx, rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """Mean loss over the first max_tokens // seq_len sequences of the stream, whatever the batch size and world
    size: sequence i goes to rank i % world_size, and the loss is summed per token then all-reduced. Every rank runs
    the same number of full-size batches (padded rows are ignored), so shapes stay fixed and collectives line up."""
    n_seq = min(max_tokens // seq_len, (len(stream) - 1) // seq_len)
    mine = list(range(rank, n_seq, world_size))
    n_batches = math.ceil(math.ceil(n_seq / world_size) / batch_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    for b in range(n_batches):
        x = torch.zeros(batch_size, seq_len, dtype=torch.long)
        y = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        for row, i in enumerate(mine[b * batch_size:(b + 1) * batch_size]):
            buf = torch.from_numpy(stream.read(i * seq_len, seq_len + 1))
            x[row], y[row] = buf[:-1], buf[1:]
        x, y = x.to(device), y.to(device)
        with amp_ctx:
            _, loss = model(x, y)
        n = (y != -1).sum()
        if n > 0:
            totals += torch.stack([loss.double() * n, n.double()])
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item(), int(totals[1].item())


def sample_text(model: GPT, prompt: str, num_tokens: int, top_k: int, seed: int, device: torch.device, amp_ctx) -> str:
    """One sample; a fresh generator per call makes it depend only on the seed and the weights."""
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    with amp_ctx:
        out = model.generate(idx, num_tokens, top_k=top_k, generator=generator)
    model.train()
    return enc.decode(out[0].tolist())


# HellaSwag, completion style: each example's four endings scored as continuations of its context. The trainer's
# --hellaswag_every uses this; hellaswag_eval.py adds the download, lm-eval's text, its command line and plots.
HELLASWAG_ENDINGS = 4
HELLASWAG_FILENAME = "hellaswag_val.jsonl"
HELLASWAG_BATCH_SIZE = 16  # examples per forward pass (4 rows each)
HELLASWAG_CONTEXT_LENGTH = 1024  # used when the model does not say how long its context is


def hellaswag_cache_file() -> str:
    """Where hellaswag_eval.py keeps the downloaded validation file: $XDG_CACHE_HOME/gpt2-trainer, else
    ~/.cache/gpt2-trainer."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2-trainer", HELLASWAG_FILENAME)


def hellaswag_label(value, where: str) -> int:
    """The label as an int 0..3: the original release stores ints, the copy on the HF Hub strings."""
    label = value
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label.strip())
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < HELLASWAG_ENDINGS:
        raise UserError(f"{where}: label {value!r} is not one of 0, 1, 2, 3")  # True is an int, never a label
    return label


def _hellaswag_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); expected the HellaSwag jsonl format") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line")
    missing = [k for k in ("ctx", "endings", "label") if k not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}; expected the HellaSwag jsonl format")
    endings = record["endings"]
    if not isinstance(record["ctx"], str):
        raise UserError(f"{where}: ctx must be a string")
    strings = isinstance(endings, list) and all(isinstance(e, str) for e in endings)
    if not strings or len(endings) != HELLASWAG_ENDINGS:
        raise UserError(f"{where}: endings must be a list of {HELLASWAG_ENDINGS} strings")
    return dict(record, label=hellaswag_label(record["label"], where))


def read_hellaswag(path: str, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag jsonl file (the first `limit`), every field of each line kept, label an int."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(_hellaswag_record(line, f"{path} line {lineno}"))
    except FileNotFoundError:
        raise UserError(f"HellaSwag data file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; expected the HellaSwag jsonl format") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; --data_file takes the path of hellaswag_val.jsonl") from None
    return examples


def gpt2_tokenize(example: dict) -> tuple[list[int], list[list[int]]]:
    """GPT-2 ids of the context and of " " + each ending, encoded separately (the reference method)."""
    enc = get_tokenizer()
    # an empty context still needs something to predict the first ending token from: <|endoftext|>
    ctx = enc.encode_ordinary(example["ctx"]) or [EOT_TOKEN]
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    return ctx, endings


class HellaSwagItem:
    """One example's token rows: row i = ctx + endings[i]; the model reads row[:-1] and is scored on the ending.
    chars[i]: the length of ending i's text in characters (at least 1), for acc_norm_chars."""

    __slots__ = ("ctx", "endings", "label", "chars")

    def __init__(self, ctx: list[int], endings: list[list[int]], label: int, chars: list[int]):
        self.ctx, self.endings, self.label, self.chars = ctx, endings, label, chars

    @property
    def input_len(self) -> int:
        return len(self.ctx) + max(len(e) for e in self.endings) - 1


def hellaswag_item(example: dict, index: int, tokenize, max_len: int) -> HellaSwagItem:
    """The example tokenised, its context cut on the left (by the same amount for every ending) so that the
    longest row fits max_len model inputs."""
    ctx, endings = tokenize(example)
    ctx, endings = list(ctx), [list(e) for e in endings]
    if len(endings) != HELLASWAG_ENDINGS:
        raise ValueError(f"example {index}: expected {HELLASWAG_ENDINGS} endings, got {len(endings)}")
    if any(len(e) == 0 for e in endings):
        raise ValueError(f"example {index}: an ending encodes to no tokens, so it cannot be scored")
    if not ctx:
        raise ValueError(f"example {index}: the context encodes to no tokens: nothing predicts the first ending token")
    longest = max(len(e) for e in endings)
    keep = max_len + 1 - longest  # the model reads len(ctx) + len(ending) - 1 tokens
    if keep < 1:
        # an ending longer than the whole context window (only with tiny models): keep one context token and
        # score each ending's first max_len tokens
        keep = 1
        endings = [e[:max_len] for e in endings]
    if len(ctx) > keep:
        ctx = ctx[-keep:]
    # lm-eval's length: the choice without the leading space; an empty ending (scored on the space alone) counts 1
    chars = [max(1, len(e)) for e in example["endings"]]
    return HellaSwagItem(ctx, endings, hellaswag_label(example.get("label"), f"example {index}"), chars)


def hellaswag_batch_tensors(items: list[HellaSwagItem], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, targets, mask), each (4 * len(items), T): right-padded inputs, next-token targets, ending positions.
    The model is causal, so the padding after a row's last real token cannot change any of its scores."""
    rows = [(it.ctx, e) for it in items for e in it.endings]
    T = max(len(c) + len(e) - 1 for c, e in rows)
    idx = torch.zeros((len(rows), T), dtype=torch.long)  # padding: token 0, valid in any vocabulary
    targets = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, (c, e) in enumerate(rows):
        row = torch.tensor(c + e, dtype=torch.long)
        n = len(row) - 1
        idx[r, :n] = row[:-1]
        targets[r, :n] = row[1:]
        mask[r, len(c) - 1 : n] = True  # logits at position t predict token t+1: ending tokens are c..c+len(e)-1
    return idx.to(device), targets.to(device), mask.to(device)


def logits_of(output) -> torch.Tensor:
    """Plain logits, (logits, loss) as our GPT returns them, or an object with .logits (transformers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"model_fn returned {type(output).__name__}; expected logits of shape (B, T, V)")


def context_length(model) -> int | None:
    """The longest input the model accepts, read from its config (our GPT, transformers models), or None."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        config = getattr(model, "config", None)
        for key in ("block_size", "n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        # unwrap torch.compile, DistributedDataParallel/FSDP and bound methods
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None) or getattr(model, "__self__", None)
    return None


def score_hellaswag_batch(model_fn, items: list[HellaSwagItem], device, autocast_dtype: torch.dtype | None,
                          vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean loss over each ending's tokens: two float64 CPU tensors of shape (len(items), 4).
    autocast_dtype None is the trainer's choice for the device (resolve_dtype's auto); fp32 is no autocast."""
    idx, targets, mask = hellaswag_batch_tensors(items, device)
    device = torch.device(device)
    dtype = resolve_dtype("auto", device) if autocast_dtype is None else autocast_dtype
    amp_ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    with torch.no_grad(), amp_ctx:
        logits = logits_of(model_fn(idx))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(idx.shape):
            raise ValueError(f"model_fn returned logits of shape {tuple(logits.shape)} for input "
                             f"{tuple(idx.shape)}; expected (B, T, V)")
        picked = logits[mask]  # (N, V): only the positions that predict ending tokens
        if vocab_size is not None:
            if picked.size(-1) < vocab_size:
                raise ValueError(f"model_fn returned {picked.size(-1)} logits per position; need at least {vocab_size}")
            picked = picked[:, :vocab_size]
        losses = F.cross_entropy(picked.float(), targets[mask], reduction="none")
    # per-row totals on the CPU in float64 (MPS has no float64); only N small numbers cross over
    mask = mask.cpu()
    sums = torch.zeros(idx.size(0), dtype=torch.float64).index_add_(0, mask.nonzero()[:, 0], losses.cpu().double())
    sums = sums.view(-1, HELLASWAG_ENDINGS)
    return sums, sums / mask.sum(dim=1).double().view(-1, HELLASWAG_ENDINGS)


def hellaswag_batches(model_fn, examples: list[dict], tokenize, max_seq_len: int | None,
                      batch_size: int) -> tuple[list[HellaSwagItem], list[list[int]]]:
    """The items, and their indices grouped into batches longest first (a batch holds rows of similar length);
    the same on every rank, since the sort is stable."""
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_seq_len or context_length(model_fn) or HELLASWAG_CONTEXT_LENGTH
    items = [hellaswag_item(ex, i, tokenize or gpt2_tokenize, max_len) for i, ex in enumerate(examples)]
    order = sorted(range(len(items)), key=lambda i: -items[i].input_len)
    return items, [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def hellaswag_chars(items: list[HellaSwagItem]) -> torch.Tensor:
    return torch.tensor([it.chars for it in items], dtype=torch.float64)


def evaluate_hellaswag(model_fn, examples: list[dict], device="cpu", batch_size: int = HELLASWAG_BATCH_SIZE,
                       rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None,
                       progress: bool = False, max_seq_len: int | None = None, tokenize=None,
                       vocab_size: int | None = GPT2_VOCAB_SIZE) -> dict:
    """HellaSwag accuracy: {"n", "acc", "acc_norm", "acc_norm_chars", "correct", "correct_norm",
    "correct_norm_chars"}. acc picks the ending of lowest summed loss, acc_norm of lowest mean loss per token
    (llm.c / build-nanogpt), acc_norm_chars of lowest summed loss per character (lm-evaluation-harness's acc_norm).

    model_fn(idx) returns logits (B, T, V >= vocab_size; the first vocab_size columns count), (logits, loss) or an
    object with .logits: a GPT, a compiled GPT or a transformers model, put in eval mode by the caller. A context
    longer than max_seq_len (default: the model's config, else 1024) loses tokens on the left. tokenize(example)
    -> (ctx_ids, [ending_ids] * 4) defaults to GPT-2 BPE of ctx and " " + ending.

    Distributed: call on every rank with the same examples. Batches are dealt round-robin; a rank short of a batch
    runs a throw-away one so that collectives inside the model line up; the counts are all-reduced, so the result
    equals the single-process one exactly."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("world_size > 1 needs torch.distributed to be initialised")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    items, batches = hellaswag_batches(model_fn, examples, tokenize, max_seq_len, batch_size)
    counts = torch.zeros(4, dtype=torch.long)  # examples, correct, correct_norm, correct_norm_chars
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="hellaswag", unit="ex", dynamic_ncols=True)
    for p in range(0, len(batches), world_size):
        mine = p + rank < len(batches)
        batch = [items[i] for i in batches[p + rank if mine else -1]]
        sums, means = score_hellaswag_batch(model_fn, batch, device, autocast_dtype, vocab_size)
        if mine:
            labels = torch.tensor([it.label for it in batch])
            counts += torch.stack([torch.tensor(len(batch))] + [(s.argmin(dim=1) == labels).sum() for s in
                                                                (sums, means, sums / hellaswag_chars(batch))])
        if bar is not None:  # the ranks move in step: count every rank's batch of this pass
            bar.update(sum(len(b) for b in batches[p:p + world_size]))
    if bar is not None:
        bar.close()
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    n, correct, correct_norm, correct_chars = (int(v) for v in counts.tolist())
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n, "acc_norm_chars": correct_chars / n,
            "correct": correct, "correct_norm": correct_norm, "correct_norm_chars": correct_chars}


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6 per weight (forward and backward matmuls) plus attention's QK^T and AV."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of the best of a few square matmuls: the practical peak of a device with no spec-sheet number.
    Sizes grow until one matmul takes 0.1 s, so a slow path (emulated bf16) costs a second, not minutes."""
    best = 0.0
    for size in (512, 1024, 2048):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection and first-touch memory
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            dt = time.perf_counter() - t0
            best = max(best, 2 * size**3 / dt)
        if dt > 0.1:
            break
    return best


def device_peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU: the user's number, a GPU table entry, or a measured matmul probe on CPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name, dtype)
        if tflops is None:
            print0(f"no peak FLOP/s known for '{name}': pass --peak_tflops to report MFU")
        return tflops * 1e12 if tflops is not None else None
    if device.type == "cpu":
        return measure_matmul_peak(device, dtype)
    return None


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: plain containers only (torch.load(weights_only=True) reads them), written atomically

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoints in out_dir, oldest first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt"))
             if (m := CKPT_PATTERN.search(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # this process's GPU only: a resume may see another number of GPUs (a run saved with 8 visible and resumed
        # with 1 would fail to restore the other 7), and each rank draws only from its own device
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # older checkpoints held every visible GPU's state: take this process's
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist; pass an existing .pt file or '--resume auto'")
    try:
        # memory-mapped: tensors are read from the page cache as they are copied into the model and optimiser, so
        # the ranks of a node share one copy of the file instead of each holding all of it (19 GB for gpt2-xl)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt or foreign files all fail here, in many different ways
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise UserError(f"checkpoint '{path}' cannot be read ({detail})") from None


def find_resume_checkpoint(out_dir: str, resume: str | None) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its contents, or (None, None) for a fresh run, which must not overwrite an
    earlier run's files. With --resume auto a damaged newest checkpoint (a crash mid-copy, a full disk) is skipped,
    with a warning, for the newest one that reads."""
    existing = list_checkpoints(out_dir) if os.path.isdir(out_dir) else []
    if resume is None:
        if existing:
            raise UserError(f"'{out_dir}' already holds checkpoints (newest {os.path.basename(existing[-1])}); "
                            "pass --resume auto to continue that run, or choose another --out_dir")
        return None, None
    if resume != "auto":
        return resume, load_checkpoint(resume)
    for path in reversed(existing):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print0(f"warning: {e}; trying the previous checkpoint")
    if existing:
        raise UserError(f"none of the {len(existing)} checkpoints in '{out_dir}' can be read; "
                        "pass --resume PATH to a good copy, or choose another --out_dir")
    return None, None


def saved_settings_of(ckpt: dict) -> dict:
    """The Settings a checkpoint was written with, as a dict (older checkpoints kept them under "args")."""
    return ckpt.get("settings") or ckpt.get("args") or {}


def model_from_checkpoint(ckpt: dict) -> GPT:
    """The model of loaded checkpoint contents, with the config it was trained with, in eval mode."""
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_checkpoint_model(path: str, device: str = "cpu") -> GPT:
    """The model of a training checkpoint file, in eval mode."""
    return model_from_checkpoint(load_checkpoint(path)).to(device)


def is_dtensor(t: object) -> bool:
    """Whether t is an FSDP shard. One can exist only once --fsdp has imported torch.distributed.tensor, so no other
    run pays that import (seconds of every start on a small CPU)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def gather_sharded(state, keep: bool, _seen: dict | None = None):
    """A (nested) state dict with every FSDP-sharded tensor gathered whole onto the CPU, so a checkpoint has one
    layout whether it was trained with FSDP, DDP or on one device. Every rank must call it (each gather is a
    collective); only a rank with keep=True holds the result, the others get None in those places. A tensor that
    appears twice (the tied embedding, in a state_dict(keep_vars=True)) is gathered once."""
    seen = {} if _seen is None else _seen
    if is_dtensor(state):
        if id(state) not in seen:
            with torch.no_grad():
                full = state.full_tensor()
            seen[id(state)] = full.detach().cpu() if keep else None
        return seen[id(state)]
    if isinstance(state, dict):
        return {k: gather_sharded(v, keep, seen) for k, v in state.items()}
    if isinstance(state, list):
        return [gather_sharded(v, keep, seen) for v in state]
    return state


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved (whole-tensor) optimizer state dict cut into the shards of this rank's FSDP parameters, so any
    checkpoint resumes under --fsdp. Every rank holds the whole checkpoint, so each cuts its own piece; no traffic."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for i, per_param in state["state"].items():
        p = params[i]
        sharded[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape else v
                      for k, v in per_param.items()}
    return {**state, "state": sharded}


# ----------------------------------------------------------------------------------------------------------------
# train loop: the settings resolved and checked, then the Trainer, whose methods are the run's parts


def resolve_settings(flags: dict, explicit: tuple[str, ...] = (), saved: dict | None = None,
                     world_size: int = 1) -> Settings:
    """A run's Settings, once and for all, from the parsed flags: the recipe's values where the command line gives
    none (a resumed run keeps the recipe of its checkpoint's settings, `saved`), the run's length in steps (--epochs
    reads the size of the train split), and every check that needs neither the model nor the data's contents."""
    values = dict(flags)
    recipe = values["recipe"] or (saved or {}).get("recipe")
    if recipe:
        values.update(recipe_values(recipe, values, explicit), recipe=recipe)
    settings = Settings(**values, explicit=explicit)
    check_settings(settings, world_size)
    if settings.epochs is not None:
        train_tokens = len(TokenStream(settings.data_dir, "train"))
        max_steps = max(1, math.ceil(settings.epochs * train_tokens / settings.total_batch_size))
        print0(f"--epochs {settings.epochs} of {train_tokens:,} tokens = {max_steps} steps")
    else:
        max_steps = settings.max_steps or DEFAULT_MAX_STEPS
    fractions = recipe_fractions(recipe, max_steps, explicit) if recipe else {}
    settings = replace(settings, max_steps=max_steps, **fractions)
    if settings.warmup_steps > settings.max_steps:
        raise UserError(f"--warmup_steps {settings.warmup_steps} is longer than --max_steps {settings.max_steps}: the "
                        "learning rate would never reach --lr; lower --warmup_steps")
    return settings


def check_settings(s: Settings, world_size: int) -> None:
    """Refuse impossible flag combinations before anything is read or written."""
    if s.epochs is not None and s.max_steps is not None:
        raise UserError("--epochs and --max_steps both set the length of the run; give one of them")
    for flag in ("batch_size", "seq_len", "total_batch_size", "max_steps", "max_bad_steps", "epochs",
                 "hellaswag_limit"):
        if getattr(s, flag) is not None and getattr(s, flag) <= 0:
            raise UserError(f"--{flag} must be positive, got {getattr(s, flag)}")
    for flag in ("val_every", "sample_every", "save_every", "hellaswag_every", "warmup_steps", "keep_last",
                 "muon_momentum_warmup"):
        if getattr(s, flag) < 0:
            raise UserError(f"--{flag} must be 0 (off) or positive, got {getattr(s, flag)}")
    if s.epochs is not None and not math.isfinite(s.epochs):
        raise UserError(f"--epochs must be a finite number, got {s.epochs}")
    for flag in ("sgd_momentum", "muon_momentum", "adam_beta1", "normuon_beta2"):
        if not 0.0 <= getattr(s, flag) < 1.0:
            raise UserError(f"--{flag} must be in [0, 1), got {getattr(s, flag)}")
    if s.fsdp and world_size < 2:
        raise UserError("--fsdp shards the model over ranks: launch with torchrun --nproc_per_node N (N >= 2)")
    if s.fsdp and s.optimizer in ("muon", "normuon"):
        raise UserError(f"--optimizer {s.optimizer} orthogonalises whole matrices, which --fsdp splits across "
                        "ranks; use --optimizer adamw or sgd with --fsdp")
    if s.lr_schedule == "wsd" and not 0.0 < s.cooldown_frac <= 1.0:
        raise UserError(f"--cooldown_frac must be in (0, 1] with --lr_schedule wsd, got {s.cooldown_frac}")
    tokens_per_micro_step = s.batch_size * s.seq_len * world_size
    if s.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total_batch_size {s.total_batch_size} is not divisible by batch_size*seq_len*world_size "
                        f"= {s.batch_size}*{s.seq_len}*{world_size} = {tokens_per_micro_step}; "
                        f"pick a total that is a multiple of it")
    if os.path.exists(s.out_dir) and not os.path.isdir(s.out_dir):
        raise UserError(f"--out_dir '{s.out_dir}' exists and is not a directory; choose another --out_dir")


def check_compatible(ckpt: dict, config: GPTConfig, s: Settings, path: str) -> None:
    """A checkpoint resumes only into the same architecture (dropout may change) and FIXED_BY_CHECKPOINT."""
    saved = GPTConfig(**ckpt["config"])
    diff = ", ".join(f"{f.name} {getattr(saved, f.name)} vs {getattr(config, f.name)}" for f in fields(GPTConfig)
                     if f.name != "dropout" and getattr(saved, f.name) != getattr(config, f.name))
    if diff:
        raise UserError(f"checkpoint '{path}' was trained with a different model ({diff}); "
                        "pass the same --model and architecture flags, or another --out_dir")
    saved_settings = saved_settings_of(ckpt)
    for name in FIXED_BY_CHECKPOINT:
        if name in saved_settings and saved_settings[name] != getattr(s, name):
            was, now = flag_text(name, saved_settings[name]), flag_text(name, getattr(s, name))
            raise UserError(f"checkpoint '{path}' was trained with {was}, not {now}; pass {was} to resume it, or "
                            "another --out_dir")


def rewrite_log(log_path: str, keep_until_step: int | None) -> None:
    """A resumed run redoes the steps after its checkpoint, so their old log lines go; a fresh run starts a new log."""
    kept = []
    if keep_until_step is not None and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_until_step]
    with atomic_write(log_path, "w") as f:
        f.writelines(kept)


class PreemptionFlag:
    """SIGTERM (preemption, torchrun shutting down) and SIGUSR1 (SLURM's warning before the time limit) are noted,
    not acted on at once: the step in progress finishes, a checkpoint is written, and the run exits cleanly."""

    def __init__(self):
        self.name: str | None = None
        self.previous = {sig: signal.signal(sig, self._note)
                         for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if sig is not None}

    def restore(self) -> None:
        """Put back the handlers from before, so the process (and anything it forks later) dies on SIGTERM again."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame) -> None:
        self.name = signal.Signals(signum).name

    @property
    def noted(self) -> bool:
        return self.name is not None


ARCH_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "n_kv_head", "norm", "pos", "rope_theta", "mlp",
              "mlp_hidden", "bias", "qk_norm", "embed_norm", "x0_lambdas", "zero_init", "logit_softcap")


def model_from_settings(s: Settings) -> tuple[GPTConfig, GPT | None]:
    """The architecture the flags ask for, or with --init_from the pretrained model's own, and its weights."""
    arch = {flag: getattr(s, flag) for flag in ARCH_FLAGS}
    arch["tie_embeddings"] = False if s.untie else None
    pretrained = None
    if s.init_from:
        given = ["--untie" if k == "tie_embeddings" else f"--{k}" for k, v in arch.items() if v is not None]
        if given:
            raise UserError(f"--init_from takes the architecture from '{s.init_from}'; drop {' '.join(given)}")
        pretrained = GPT.from_pretrained(s.init_from, dropout=s.dropout)
        config = pretrained.config
    else:
        config = model_config(s.model, dropout=s.dropout, **arch)
    if s.seq_len > config.block_size:
        raise UserError(f"--seq_len {s.seq_len} exceeds the model's block_size {config.block_size}; "
                        f"lower --seq_len or raise --block_size")
    return config, pretrained


def fsdp_gather_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype FSDP gathers the Blocks' parameters in (None: as stored, fp32). Under bf16 autocast on CUDA it is
    bf16, half fp32's traffic, and the same numbers: autocast rounds the matmul weights to bf16 anyway, and computes
    layer_norm and rms_norm in fp32 whatever their weights' dtype. A CPU's autocast does not (an fp32 input with bf16
    norm weights is an error there), and fp16 stays fp32 too: a norm weight's gradient, summed over every position
    and multiplied by the loss scale, would overflow in fp16 where the fp32 parameter's does not."""
    return torch.bfloat16 if dtype == torch.bfloat16 and device.type == "cuda" else None


def shard_model(model: GPT, device: torch.device, world_size: int, dtype: torch.dtype, compile_blocks: bool) -> None:
    """FSDP2, in place: every Block, then the rest (embeddings, final norm, head) as the root. A block's parameters
    are gathered just before it runs and freed after it, so a rank holds 1/world_size of the parameters, gradients
    and optimizer state, plus about one whole block at a time.

    The Blocks are gathered in fsdp_gather_dtype and their gradients reduce-scattered in fp32, so the sum over ranks
    loses nothing; the root stays fp32 and the Blocks' inputs are not cast, so the residual stream is fp32 as under
    DDP. With compile_blocks each Block is compiled on its own, as torchtitan does: the repeated Blocks share one
    graph, and FSDP's gather and free hooks run between graphs instead of being traced through."""
    from torch.distributed.device_mesh import init_device_mesh  # here, so only --fsdp pays the import (see is_dtensor)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the logits are returned as a view; FSDP warns in case a caller edits them in place, which nothing here does
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=fsdp_gather_dtype(device, dtype), reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        if compile_blocks:
            block.compile()
    fully_shard(model, mesh=mesh)


class Trackers:
    """The run's log.jsonl mirrored, record for record with the same keys, into TensorBoard event files under
    out_dir/tensorboard (--tensorboard) and a W&B run (--wandb PROJECT), each with the arguments and config once.
    Made on rank 0 only. A resumed run logs into the same W&B run (its id is in the checkpoint), and TensorBoard
    hides the events of the steps it redoes, so neither shows a step twice."""

    def __init__(self, s: Settings, config: GPTConfig, step: int, wandb_id: str | None):
        self.tensorboard = self.wandb = None
        self.wandb_id = wandb_id
        settings = {"settings": asdict(s), "config": asdict(config)}
        if s.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            # purge_step: readers drop the old events from this step on, the ones the resumed run writes again;
            # the writer's own thread flushes every few seconds, so a step never waits on the disk
            self.tensorboard = SummaryWriter(os.path.join(s.out_dir, "tensorboard"),
                                             purge_step=step + 1 if step else None, flush_secs=10)
            if not step:
                for name, values in settings.items():
                    self.tensorboard.add_text(name, f"```\n{json.dumps(values, indent=1)}\n```", 0)
        if s.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb_id = wandb_id or os.urandom(6).hex()  # a new run's id; the checkpoint keeps it
            self.wandb = wandb.init(project=s.wandb, id=self.wandb_id, resume="allow", dir=s.out_dir,
                                    config=settings)

    def log(self, record: dict) -> None:
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    """One training run. Its state lives here, and each part of a run is a method, in the order a run uses them:
    setup (inputs checked, processes joined, model and optimisers built, a checkpoint restored, the run described),
    then per step: train_step() (one optimisation step), evaluate(), log(), save(); run() is the loop around them.

    `model` is the GPT itself (its weights are saved, sampled and scored on HellaSwag); `compiled` is the same
    module behind torch.compile where the run compiles (evaluation calls it), and `wrapped` is that behind DDP
    where there are ranks to synchronise (training calls it). Without compile or DDP they are one object."""

    def __init__(self, settings: Settings, resume_path: str | None = None, ckpt: dict | None = None):
        self.settings = settings
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        self.master = self.rank == 0
        pretrained = self.check_inputs(resume_path, ckpt)
        self.start_processes()
        self.build(pretrained if ckpt is None else None, ckpt["model"] if ckpt is not None else None)
        del pretrained
        self.step = self.bad_steps = 0
        self.preempted: PreemptionFlag | None = None  # the signal handlers, installed while run() runs
        self.any_rank_signalled = False
        if ckpt is not None:
            self.restore(ckpt, resume_path)
        else:
            torch.manual_seed(settings.seed + self.rank)
        self.describe(resumed=ckpt is not None)
        self.trackers = (Trackers(settings, self.config, self.step, ckpt.get("wandb_id") if ckpt else None)
                         if self.master else None)
        if ckpt is None and (self.val_stream is not None or self.hellaswag_examples is not None):
            record = {"step": 0, "tokens": 0}
            self.evaluate(record)
            self.log(record)

    def check_inputs(self, resume_path: str | None, ckpt: dict | None) -> GPT | None:
        """What the settings alone cannot say is right, checked before a process group, a file or a model exists:
        the device, the model, the data, HellaSwag's file, the checkpoint's match; returns --init_from's model."""
        s = self.settings
        self.device = resolve_device(s.device, self.local_rank)
        self.dtype = resolve_dtype(s.dtype, self.device)
        self.config, pretrained = model_from_settings(s)
        self.grad_accum = s.micro_steps(self.world_size)
        self.train_loader = ShardLoader(s.data_dir, "train", s.batch_size, s.seq_len, self.rank, self.world_size,
                                        self.config.vocab_size, s.bos_aligned, s.shuffle, s.seed)
        self.val_stream = TokenStream(s.data_dir, "val", self.config.vocab_size) if s.val_every else None
        self.hellaswag_examples = None
        if s.hellaswag_every:
            path = s.hellaswag_file or hellaswag_cache_file()
            if not s.hellaswag_file and not os.path.exists(path):
                raise UserError(f"--hellaswag_every reads {path}, which is not there: fetch it once with "
                                "`python hellaswag_eval.py --download`, or pass --hellaswag_file PATH")
            self.hellaswag_examples = read_hellaswag(path, s.hellaswag_limit)
        if ckpt is not None:
            check_compatible(ckpt, self.config, s, resume_path)
        self.use_compile = resolve_compile(s.compile, self.device)
        return pretrained

    def start_processes(self) -> None:
        """The process group under torchrun; TF32 and the autocast context for the chosen dtype."""
        if self.distributed:
            # torchrun's agent keeps its key-value store across restarts (--max_restarts): without a prefix per
            # attempt, a restarted rank can read a dead peer's address left over from the attempt before and never
            # connect
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo", store=store,
                                    rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(minutes=self.settings.dist_timeout))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls autocast leaves
            torch.backends.cudnn.allow_tf32 = True
        self.amp_ctx = nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, self.dtype)

    def build(self, pretrained: GPT | None, weights: dict | None) -> None:
        """Model and optimisers: identical init on every rank from --seed (or the checkpoint's weights, loaded
        whole, before sharding: every checkpoint has the same layout); then sharded (FSDP), compiled and wrapped
        (DDP) as the flags ask."""
        s = self.settings
        random.seed(s.seed)
        np.random.seed(s.seed)
        torch.manual_seed(s.seed)
        self.model = (pretrained if pretrained is not None else GPT(self.config)).to(self.device)
        self.model.activation_checkpointing = s.activation_checkpointing
        self.model.chunked_loss = s.chunked_loss
        if weights is not None:
            self.model.load_state_dict(weights)
        if s.fsdp:
            shard_model(self.model, self.device, self.world_size, self.dtype, compile_blocks=self.use_compile)
        self.optimizers = configure_optimizers(self.model, s, self.device.type, fast_matmul_dtype(self.device))
        self.lr_flags = {group["lr_flag"] for optimizer in self.optimizers for group in optimizer.param_groups}
        # Under FSDP each rank unscales only its own gradient shards, but DTensor's kernel for the unscale op takes
        # the max of the inf/NaN flag over the ranks, so every rank skips the same steps with the plain scaler
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # evaluation shares the compiled model; under FSDP the Blocks were compiled one by one as they were sharded
        self.compiled = torch.compile(self.model) if self.use_compile and not s.fsdp else self.model
        self.wrapped = self.compiled
        if self.distributed and not s.fsdp:
            # the buffers (vocabulary mask, RoPE tables) are constants every rank computes alike: no broadcast
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.compiled, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.tokens_per_step = s.total_batch_size
        self.n_params = self.model.num_params()
        self.flops_per_step = flops_per_token(self.config, s.seq_len, self.n_params) * self.tokens_per_step
        self.peak_flops = device_peak_flops(self.device, self.dtype, s.peak_tflops) if self.master else None
        # A probed peak is only the best matmul seen at startup, on a machine that may have been busy then; a step
        # that beats it shows the device can do more, so it becomes the peak and MFU stays a fraction of what is
        # possible.
        self.peak_is_probed = self.device.type == "cpu" and not s.peak_tflops
        self.log_path = os.path.join(s.out_dir, "log.jsonl")

    def restore(self, ckpt: dict, path: str) -> None:
        """Optimiser and scaler state, data position, step and random state: the run continues exactly."""
        s = self.settings
        saved = ckpt["optimizer"]
        for optimizer, state in zip(self.optimizers, saved if isinstance(saved, list) else [saved]):
            optimizer.load_state_dict(shard_optimizer_state(state, optimizer) if s.fsdp else state)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.train_loader.load_state_dict(ckpt["loader"])
        self.step = ckpt["step"]
        if len(ckpt["rng"]) == self.world_size:
            set_rng_state(ckpt["rng"][self.rank])
        else:
            print0(f"checkpoint was written by {len(ckpt['rng'])} ranks, this run has {self.world_size}: reseeding")
            torch.manual_seed(s.seed + 7919 * self.step + self.rank)
        print0(f"resumed from {path} at step {self.step}")

    def describe(self, resumed: bool) -> None:
        """The run's out_dir and log (a resumed run's log loses the steps it redoes), and its startup lines."""
        s = self.settings
        if not self.master:
            return
        os.makedirs(s.out_dir, exist_ok=True)
        rewrite_log(self.log_path, self.step if resumed else None)
        print0(f"model {s.init_from or s.model}: {self.n_params:,} parameters | device {self.device} | "
               f"dtype {str(self.dtype)[6:]} | compile {self.use_compile} | world size {self.world_size}"
               + (" (FSDP)" if s.fsdp else ""))
        print0(f"settings: {s.as_flags()}")
        optimizer_names = " + ".join(type(o).__name__ + (" (fused)" if o.defaults.get("fused") else "")
                                     for o in self.optimizers)
        print0(f"batch {self.tokens_per_step:,} tokens = {s.batch_size} x {s.seq_len} x {self.world_size} "
               f"ranks x {self.grad_accum} micro-steps | {len(self.train_loader.stream):,} train tokens | "
               f"{optimizer_names}")
        if s.recipe:
            recipe = RECIPES[s.recipe]
            named = [*recipe["flags"], *recipe["fractions"]]
            resolved = " ".join(f"--{flag} {getattr(s, flag):.4g}" if isinstance(getattr(s, flag), float)
                                else f"--{flag} {getattr(s, flag)}" for flag in named)
            given = " ".join(f"--{flag}" for flag in s.explicit if flag in named)
            print0(f"recipe {s.recipe}: {resolved}" + (f" (given on the command line: {given})" if given else ""))
        loader = self.train_loader
        if loader.rows is not None:
            skipped = loader.skipped_tokens()
            print0(f"data: {len(loader.rows):,} rows of {s.seq_len + 1} tokens"
                   + (" starting at document starts" if s.bos_aligned else "")
                   + (", shuffled every epoch" if s.shuffle else "")
                   + f"; {skipped:,} train tokens ({100 * skipped / len(loader.stream):.1f}%) skipped")

    def set_schedule(self) -> float:
        """Every group's LR (and Muon's momentum) for the coming step: its flag's peak LR times the schedule's
        multiplier, which it returns."""
        s = self.settings
        scale = lr_at(self.step, 1.0, s.warmup_steps, s.max_steps, s.min_lr_ratio, s.lr_schedule, s.cooldown_frac)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = getattr(s, group.get("lr_flag", "lr")) * scale
                if isinstance(optimizer, Muon):
                    group["momentum"] = muon_momentum_at(self.step, s.muon_momentum, s.muon_momentum_warmup)
        return scale

    def accumulate_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward over the step's micro-batches; returns their mean loss, on the device, and under
        torchrun the number of ranks that had noted a stop signal (see PreemptionFlag), else None."""
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP all-reduces gradients once, on the last micro-step. FSDP reduce-scatters after every backward:
            # deferring would hold whole unsharded gradients, the memory it is there to save.
            sync = not self.distributed or self.settings.fsdp or micro_step == self.grad_accum - 1
            with nullcontext() if sync else self.wrapped.no_sync():
                with self.amp_ctx:
                    _, loss = self.wrapped(x, y)
                loss = loss / self.grad_accum  # the mean over micro-steps, as one large batch would give
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        if not self.distributed:
            return loss_sum, None
        # All ranks must stop after the same step, or the others would hang in the next collective: whether any rank
        # got a signal travels in the loss's all-reduce, and is read in the step's one host sync. torch.full is a
        # kernel launch, where torch.tensor(flag, device=...) would be a host-to-device copy.
        signalled = torch.full((), float(self.preempted is not None and self.preempted.noted), device=self.device)
        totals = torch.stack([loss_sum, signalled])
        dist.all_reduce(totals)
        return totals[0] / self.world_size, totals[1]

    def train_step(self) -> tuple[float, float, float]:
        """One optimisation step: the schedule, the gradients, clipping, and the update unless the loss or the
        gradient norm is not finite. Returns the schedule's LR multiplier, the mean loss and the gradient norm."""
        s = self.settings
        lr_scale = self.set_schedule()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss_sum, signals = self.accumulate_gradients()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip or float("inf"))
        if is_dtensor(grad_norm):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        # the step's one host sync: the device runs ahead of Python everywhere else
        tracked = [loss_sum, grad_norm.float()] + ([signals] if signals is not None else [])
        train_loss, grad_norm, *signalled = torch.stack(tracked).tolist()
        self.any_rank_signalled = bool(signalled) and signalled[0] > 0  # the same answer on every rank
        # every rank sees the same all-reduced loss and gradients, so every rank makes the same decision here;
        # with fp16, overflowing gradients are the GradScaler's business (it skips the step and lowers the scale)
        if math.isfinite(train_loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm)):
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            print0(f"step {self.step + 1:5d} | non-finite loss or gradient norm: update skipped "
                   f"({self.bad_steps} in a row)")
            if self.bad_steps >= s.max_bad_steps:
                raise UserError(f"stopping at step {self.step + 1}: {self.bad_steps} steps in a row had a non-finite "
                                "loss or gradient norm; lower --lr or resume from an earlier checkpoint")
        self.scaler.update()
        self.step += 1
        return lr_scale, train_loss, grad_norm

    def step_record(self, lr_scale: float, train_loss: float, grad_norm: float, dt: float) -> dict:
        """The step's log record, and its printed line: loss, LR, gradient norm, time, throughput, MFU. The LR is
        --lr's as scheduled where that is the only peak LR in use, else the multiplier every peak LR gets."""
        s = self.settings
        if self.peak_is_probed and self.peak_flops:
            self.peak_flops = max(self.peak_flops, self.flops_per_step / dt / self.world_size)
        mfu = self.flops_per_step / dt / (self.peak_flops * self.world_size) if self.peak_flops else None
        lr = {"lr": s.lr * lr_scale} if "lr" in self.lr_flags else {}
        record = {"step": self.step, "train_loss": train_loss, **lr, "lr_scale": lr_scale, "grad_norm": grad_norm,
                  "tokens": self.step * self.tokens_per_step, "dt_ms": 1000 * dt,
                  "tok_per_s": self.tokens_per_step / dt, "mfu": mfu}
        lr_text = f"lr {s.lr * lr_scale:.2e}" if self.lr_flags == {"lr"} else f"lr x{lr_scale:.3f}"
        print0(f"step {self.step:5d}/{s.max_steps} | loss {train_loss:.4f} | {lr_text} | "
               f"norm {grad_norm:.3f} | {1000 * dt:.1f} ms | {record['tok_per_s']:,.0f} tok/s"
               + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""))
        return record

    def evaluate(self, record: dict) -> None:
        """Validation loss, HellaSwag and a sample, as the flags ask, into the record; every rank takes part."""
        s, step = self.settings, self.step
        last = step == s.max_steps
        self.compiled.eval()
        if self.val_stream is not None and (step % s.val_every == 0 or last):
            val_loss, n_tokens = evaluate_loss(self.compiled, self.val_stream, s.batch_size, s.seq_len,
                                               s.val_tokens, self.device, self.amp_ctx, self.rank, self.world_size)
            record["val_loss"] = val_loss
            print0(f"step {step:5d} | val loss {val_loss:.4f} over {n_tokens:,} tokens")
        if self.hellaswag_examples is not None and (step % s.hellaswag_every == 0 or last):
            # eager model: the ragged HellaSwag batches would make a compiled graph recompile for every shape
            result = evaluate_hellaswag(self.model, self.hellaswag_examples, self.device, rank=self.rank,
                                        world_size=self.world_size, autocast_dtype=self.dtype)
            record["hellaswag_acc_norm"] = result["acc_norm"]  # per token, as llm.c reports it
            record["hellaswag_acc_norm_chars"] = result["acc_norm_chars"]  # per character, as lm-eval does
            print0(f"step {step:5d} | hellaswag acc_norm {result['acc_norm']:.4f} "
                   f"acc_norm_chars {result['acc_norm_chars']:.4f} over {result['n']} examples")
        self.compiled.train()
        if s.sample_every and step > 0 and (step % s.sample_every == 0 or last):
            text = sample_text(self.model, s.prompt, s.sample_tokens, s.top_k, s.seed + self.rank,
                               self.device, self.amp_ctx)
            print0(f"step {step:5d} | sample: {text!r}")

    def log(self, record: dict) -> None:
        """One line of log.jsonl, mirrored to TensorBoard and W&B; rank 0 only."""
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)

    def checkpoint(self) -> dict | None:
        """Everything a resume needs, gathered to rank 0 (None on the other ranks); refuses non-finite weights."""
        s = self.settings
        rngs = [None] * self.world_size
        if self.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        finite = torch.tensor(float(all(torch.isfinite(p.to_local() if is_dtensor(p) else p).all()
                                        for p in self.model.parameters())), device=self.device)
        if s.fsdp:  # each rank sees only its own shards
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise UserError(f"refusing to save step {self.step}: the weights are not finite; "
                            "resume from an earlier checkpoint")
        model_state = self.model.state_dict(keep_vars=s.fsdp)
        optimizer_states = [o.state_dict() for o in self.optimizers]
        if s.fsdp:
            model_state, optimizer_states = gather_sharded([model_state, optimizer_states], keep=self.master)
        if not self.master:
            return None
        return {"model": model_state, "optimizer": optimizer_states, "scaler": self.scaler.state_dict(),
                "step": self.step, "loader": self.train_loader.state_dict(), "rng": rngs,
                "config": asdict(self.config), "settings": asdict(s), "wandb_id": self.trackers.wandb_id}

    def save(self) -> None:
        """The checkpoint of this step, written atomically and read back before it takes its name; then the oldest
        beyond --keep_last go."""
        state = self.checkpoint()
        if state is None:
            return
        path = checkpoint_path(self.settings.out_dir, self.step)
        # read back before the rename (memory-mapped, so cheap): an unreadable file never replaces a good one
        verify = lambda tmp: torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)  # noqa: E731
        try:
            with atomic_write(path, verify=verify) as f:
                torch.save(state, f)
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror or e}); the earlier checkpoints are intact: "
                            "free some space, then continue with --resume auto") from None
        print0(f"step {self.step:5d} | saved {path}")
        if self.settings.keep_last:
            for old in list_checkpoints(self.settings.out_dir)[:-self.settings.keep_last]:
                os.remove(old)

    def run(self) -> None:
        """Steps until --max_steps (or --stop_at_step, or a signal), each evaluated, logged and checkpointed as the
        flags ask. A step's time runs from the end of the one before, less what that one spent on evaluation,
        logging and checkpoints."""
        s = self.settings
        stop_at = min(s.max_steps, s.stop_at_step or s.max_steps)
        preempted = self.preempted = PreemptionFlag()
        try:
            t_last = time.perf_counter()
            while self.step < stop_at:
                lr_scale, train_loss, grad_norm = self.train_step()
                t_sync = time.perf_counter()
                dt, t_last = t_sync - t_last, t_sync
                record = self.step_record(lr_scale, train_loss, grad_norm, dt)
                self.evaluate(record)
                self.log(record)
                # one process reads its own flag; ranks go by what the step's all-reduce said of all of them
                stop_now = self.any_rank_signalled if self.distributed else preempted.noted
                if (s.save_every and self.step % s.save_every == 0) or self.step == stop_at or stop_now:
                    self.save()
                t_last += time.perf_counter() - t_sync  # evaluation and checkpoints are not the next step's time
                if stop_now:
                    print0(f"step {self.step:5d} | stopping after {preempted.name or 'a signal to another rank'}; "
                           "continue with --resume auto")
                    break
        finally:
            preempted.restore()
            if self.trackers is not None:
                self.trackers.close()
        if self.distributed:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# CLI: the flags of Settings, and main


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, except a default of None: that help says itself what applies."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(description: str = "Pretrain GPT-2 on uint16 token shards (one CPU, one GPU, or torchrun).",
                 names: tuple[str, ...] | None = None, helps: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line of Settings: a flag per field (or per field in `names`, for a helper script that shares
    some, with `helps` saying what they mean there), typed from its annotation, grouped under FLAG_GROUPS."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)
    group = p
    for f in fields(Settings):
        if "help" not in f.metadata or (names is not None and f.name not in names):
            continue
        group = p.add_argument_group(FLAG_GROUPS[f.name]) if f.name in FLAG_GROUPS and names is None else group
        options = {**f.metadata, "help": (helps or {}).get(f.name, f.metadata["help"])}
        kind = f.type.replace(" | None", "")
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = {"int": int, "float": float, "str": str}[kind]
        group.add_argument(f"--{f.name}", default=f.default, **options)
    return p


def parse_flags(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
                ) -> tuple[dict, tuple[str, ...]]:
    """The flags' values (defaults filled in) and the names of those the command line gave itself."""
    parser = parser or build_parser()
    # every flag starts out as a marker, which argparse leaves wherever the command line says nothing
    unset = object()
    given = vars(parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions})))
    given.pop("help", None)
    values = {name: parser.get_default(name) if value is unset else value for name, value in given.items()}
    return values, tuple(sorted(name for name, value in given.items() if value is not unset))


def parse_settings(argv: list[str] | None = None, world_size: int = 1) -> Settings:
    """The Settings of a fresh run's command line."""
    return resolve_settings(*parse_flags(argv), world_size=world_size)


def train(flags: dict, explicit: tuple[str, ...]) -> None:
    """A training run from its parsed command line: the checkpoint to resume (whose settings the run is checked
    against), the settings resolved, then the Trainer."""
    resume_path, ckpt = find_resume_checkpoint(flags["out_dir"], flags["resume"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    settings = resolve_settings(flags, explicit, saved_settings_of(ckpt) if ckpt else None, world_size)
    Trainer(settings, resume_path, ckpt).run()


def out_of_memory_message(e: torch.OutOfMemoryError, flags: dict) -> str:
    """One line for a device out of memory: where, what was asked for, and the flags that fix it."""
    said = str(e)
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", said)
    total = re.search(r"total capacity of ([\d.]+ \w+)", said)
    where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
    detail = ", ".join(part for part in (asked and f"asked for {asked.group(1)} more",
                                         total and f"{total.group(1)} on the device") if part)
    model = flags["init_from"] or flags["model"]
    return (f"out of memory{where} at --batch_size {flags['batch_size']} x --seq_len {flags['seq_len']} with --model "
            f"{model}{f' ({detail})' if detail else ''}: lower --batch_size (--total_batch_size stays the same, with "
            "more micro-steps), or add --activation_checkpointing or --fsdp; the README's memory table (python "
            "benchmarks/memory_table.py) gives what each model needs")


def main(argv: list[str] | None = None) -> None:
    flags, explicit = parse_flags(argv)
    try:
        train(flags, explicit)
    except UserError as e:
        if is_master():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:
        # every rank that ran out says so: under torchrun it may be one rank of many
        print(f"error: {out_of_memory_message(e, flags)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
