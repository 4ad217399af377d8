"""
Pretrain GPT-2 (124M ... 1.5B, plus small CPU presets) from uint16 token shards.

One file, read top to bottom:
  config -> model -> data -> optimizer/schedule -> evaluation -> checkpoint -> train loop -> CLI

  python train_gpt2.py --model d6 --data_dir data/gutenberg           # one CPU or one GPU
  torchrun --standalone --nproc_per_node 8 train_gpt2.py --model gpt2   # DDP on one node
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BPE_RANKS_PATH = os.path.join(HERE, "data", "gpt2.tiktoken")
EOT_TOKEN = 50256  # <|endoftext|>: prefixed to every document
GPT2_VOCAB_SIZE = 50257


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


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = GPT2_VOCAB_SIZE  # real token ids; ids at or above it are never predicted
    padded_vocab_size: int = 50304  # 50257 rounded up to a multiple of 128: faster matmuls on every device
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


# GPT-2 sizes as released, and small presets where the width follows the depth (64 per layer, heads of 64)
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    **{f"d{d}": dict(n_layer=d, n_head=d, n_embd=64 * d) for d in (2, 4, 6, 8, 12)},
}


def model_config(preset: str, **overrides: int | None) -> GPTConfig:
    """The GPTConfig of a preset, with any non-None override (n_layer, n_head, n_embd, block_size) applied."""
    if preset not in PRESETS:
        raise UserError(f"unknown --model '{preset}'; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = GPTConfig(**values)
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} is not divisible by --n_head {config.n_head}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# model: GPT-2 as released (pre-norm blocks, learned positions, biases, tied embeddings), HF-weight-compatible


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
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
            n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, padded_vocab_size) for every position; with targets, the mean cross-entropy over the
        targets that are not -1 (ignored positions)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.lm_head.weight, self.vocab_mask)
        loss = None
        if targets is not None:
            # the softmax in fp32 whatever the autocast dtype: bf16 log-probabilities are too coarse for a loss
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); deterministic for a seeded generator."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> "GPT":
        """GPT-2 weights from a Hugging Face hub name (gpt2, gpt2-medium, ...) or a local GPT2LMHeadModel directory."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise UserError("loading Hugging Face weights needs transformers: pip install transformers") from None
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load '{name_or_dir}' as a GPT-2 model ({str(e).splitlines()[0]}); "
                            "without network access, pass a local directory saved by save_pretrained") from None
        c = hf.config
        unsupported = [what for what, ok in (
            ("untied embeddings", c.tie_word_embeddings),
            (f"activation {c.activation_function}", c.activation_function in ("gelu_new", "gelu_pytorch_tanh")),
            (f"n_inner {c.n_inner}", c.n_inner in (None, 4 * c.n_embd)),
            (f"layer_norm_epsilon {c.layer_norm_epsilon}", c.layer_norm_epsilon == 1e-5),
            ("scale_attn_by_inverse_layer_idx", not c.scale_attn_by_inverse_layer_idx),
            ("reorder_and_upcast_attn", not c.reorder_and_upcast_attn),
        ) if not ok]
        if unsupported:
            raise UserError(f"'{name_or_dir}' is a GPT-2 variant this model cannot represent: {', '.join(unsupported)}")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, padded_vocab_size=128 * math.ceil(c.vocab_size / 128))
        model = cls(config)
        hf_sd = hf.state_dict()
        # HF stores these as Conv1D, i.e. (in, out): transpose into nn.Linear's (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, p in model.state_dict().items():
                w = hf_sd[name]
                if name.endswith(transposed):
                    w = w.t()
                if name in ("transformer.wte.weight", "lm_head.weight"):
                    p.zero_()  # padding rows stay zero: they are masked out of every softmax anyway
                    p[: w.size(0)].copy_(w)
                else:
                    p.copy_(w)
        return model


# ----------------------------------------------------------------------------------------------------------------
# data: GPT-2 tokenizer; llm.c (*.bin) and build-nanogpt (*.npy) shards, read as one memory-mapped token stream


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """GPT-2's BPE from the bundled ranks: ids identical to tiktoken's `gpt2`, with no download. Built once per
    process: parsing the 50k-line ranks file is not free."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    if not os.path.exists(BPE_RANKS_PATH):
        raise UserError(f"GPT-2 BPE ranks not found at {BPE_RANKS_PATH}; restore data/gpt2.tiktoken from the repository")
    return tiktoken.Encoding(
        name="gpt2",
        # GPT-2's own pre-tokenisation pattern: contractions, letters, numbers, punctuation, whitespace
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=load_tiktoken_bpe(BPE_RANKS_PATH),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256  # the header is 256 int32: magic, version, token count, then zeros
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Write uint16 tokens as an llm.c shard, atomically: a crash never leaves a truncated file under `path`."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with atomic_write(path) as f:
        f.write(header.tobytes())
        tokens.astype(np.uint16, copy=False).tofile(f)  # no bytes copy of a 200 MB shard


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
        raise UserError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header; regenerate it with prepare_fineweb.py")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise UserError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not an llm.c token shard; regenerate it with prepare_fineweb.py")
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION} (uint16 GPT-2 tokens)")
    n_tokens = int(header[2])
    if size != HEADER_BYTES + 2 * n_tokens:
        raise UserError(f"shard {path} is truncated or padded: its header says {n_tokens} tokens but the file holds {(size - HEADER_BYTES) / 2:.0f}; regenerate it")
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


class ShardLoader:
    """Training batches from one split. Every micro-step, rank r of W reads the r-th of W adjacent (B*T + 1)-token
    windows at a position all ranks share, then all move on by W*B*T: ranks never overlap, every token is visited
    once an epoch (across shard boundaries), and all ranks wrap to the next epoch on the same step. The position is
    all the state there is, so it goes into checkpoints."""

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int = GPT2_VOCAB_SIZE):
        self.stream = TokenStream(data_dir, split, vocab_size)
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.stride = batch_size * seq_len * world_size
        if len(self.stream) < self.stride + 1:
            raise UserError(f"the '{split}' split in '{data_dir}' has {len(self.stream):,} tokens, fewer than one "
                            f"micro-batch over all ranks ({self.stride + 1:,}); lower --batch_size or --seq_len")
        self.position = 0
        self.epoch = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.stride + 1 > len(self.stream):
            self.position, self.epoch = 0, self.epoch + 1
        buf = torch.from_numpy(self.stream.read(self.position + self.rank * self.B * self.T, self.B * self.T + 1))
        self.position += self.stride
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


# ----------------------------------------------------------------------------------------------------------------
# optimizer and learning-rate schedule


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str,
                        betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings (>= 2-D) but not biases and norm gains; the tied embedding is one
    Parameter, so named_parameters() yields it once. Fused where this torch supports the device, and it says so."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError) as e:
        print0(f"fused AdamW is not available on {device_type} ({e}); using the foreach implementation")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from max_lr/warmup_steps (never 0: step 0 must learn), then cosine down to min_lr_ratio*max_lr
    at max_steps, and flat after."""
    min_lr = max_lr * min_lr_ratio
    if step >= max_steps:
        return min_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ----------------------------------------------------------------------------------------------------------------
# evaluation: validation loss, samples, model FLOPs utilisation

# Dense bf16 tensor-core peaks in TFLOP/s by device-name fragment; fp32 runs use TF32, half of these.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "L4": 121.0,
                   "4090": 165.0, "3090": 71.0, "A10G": 70.0, "V100": 125.0, "T4": 65.0}


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
        for fragment, tflops in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return tflops * 1e12 / (2 if dtype == torch.float32 else 1)
        print0(f"no peak FLOP/s known for '{name}': pass --peak_tflops to report MFU")
        return None
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
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist; pass an existing .pt file or '--resume auto'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or foreign files all fail here, in many different ways
        raise UserError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_checkpoint_model(path: str, device: str = "cpu") -> GPT:
    """The model of a training checkpoint, with the config it was trained with, in eval mode."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# train loop


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
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    try:  # MPS has bf16 only on recent macOS; a tiny matmul is the reliable test
        with torch.autocast(device.type, dtype=torch.bfloat16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        return True
    except RuntimeError:
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware has it (recent GPUs and CPUs), else fp16 on CUDA (with a GradScaler), else fp32."""
    if name == "auto":
        name = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    elif name == "bf16" and not native_bf16(device):
        if device.type != "cpu":
            raise UserError(f"--dtype bf16 is not supported on this {device.type} device; use --dtype fp16 or fp32")
        print0("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and much slower than fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def check_args(args: argparse.Namespace, config: GPTConfig, world_size: int) -> int:
    """Refuse impossible flag combinations before anything is read or written; returns grad-accumulation steps."""
    if args.seq_len > config.block_size:
        raise UserError(f"--seq_len {args.seq_len} exceeds the model's block_size {config.block_size}; "
                        f"lower --seq_len or raise --block_size")
    for flag in ("batch_size", "seq_len", "total_batch_size", "max_steps", "max_bad_steps"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
    for flag in ("val_every", "sample_every", "save_every", "hellaswag_every", "warmup_steps", "keep_last"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 (off) or positive, got {getattr(args, flag)}")
    if args.hellaswag_limit is not None and args.hellaswag_limit < 1:
        raise UserError(f"--hellaswag_limit must be positive (or left out for all examples), got {args.hellaswag_limit}")
    if args.warmup_steps > args.max_steps:
        raise UserError(f"--warmup_steps {args.warmup_steps} is longer than --max_steps {args.max_steps}: the learning "
                        "rate would never reach --lr; lower --warmup_steps")
    tokens_per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total_batch_size {args.total_batch_size} is not divisible by batch_size*seq_len*world_size "
                        f"= {args.batch_size}*{args.seq_len}*{world_size} = {tokens_per_micro_step}; "
                        f"pick a total that is a multiple of it")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out_dir '{args.out_dir}' exists and is not a directory; choose another --out_dir")
    return args.total_batch_size // tokens_per_micro_step


def find_resume_checkpoint(args: argparse.Namespace) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its contents, or (None, None) for a fresh run, which must not overwrite an
    earlier run's files. With --resume auto a damaged newest checkpoint (a crash mid-copy, a full disk) is skipped,
    with a warning, for the newest one that reads."""
    existing = list_checkpoints(args.out_dir) if os.path.isdir(args.out_dir) else []
    if args.resume is None:
        if existing:
            raise UserError(f"'{args.out_dir}' already holds checkpoints (newest {os.path.basename(existing[-1])}); "
                            "pass --resume auto to continue that run, or choose another --out_dir")
        return None, None
    if args.resume != "auto":
        return args.resume, load_checkpoint(args.resume)
    for path in reversed(existing):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print0(f"warning: {e}; trying the previous checkpoint")
    if existing:
        raise UserError(f"none of the {len(existing)} checkpoints in '{args.out_dir}' can be read; "
                        "pass --resume PATH to a good copy, or choose another --out_dir")
    return None, None


def check_compatible(ckpt: dict, config: GPTConfig, path: str) -> None:
    saved = GPTConfig(**ckpt["config"])
    if saved != config:
        diff = ", ".join(f"{f.name} {getattr(saved, f.name)} vs {getattr(config, f.name)}"
                         for f in fields(GPTConfig) if getattr(saved, f.name) != getattr(config, f.name))
        raise UserError(f"checkpoint '{path}' was trained with a different model ({diff}); "
                        "pass the same --model and size flags, or another --out_dir")


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

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether any rank got a signal: all ranks must stop after the same step, or the others would hang."""
        if not distributed:
            return self.name is not None
        flag = torch.tensor([float(self.name is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(args: argparse.Namespace) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    master = rank == 0

    # ---- everything a user can get wrong is checked before a process group, a file or a model exists
    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    config = model_config(args.model, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size)
    grad_accum = check_args(args, config, world_size)
    train_loader = ShardLoader(args.data_dir, "train", args.batch_size, args.seq_len, rank, world_size,
                               config.vocab_size)
    val_stream = TokenStream(args.data_dir, "val", config.vocab_size) if args.val_every else None
    hellaswag_examples = None
    if args.hellaswag_every:
        import hellaswag_eval
        hellaswag_examples = hellaswag_eval.load_examples(args.hellaswag_file, args.hellaswag_limit)
    resume_path, ckpt = find_resume_checkpoint(args)
    if ckpt is not None:
        check_compatible(ckpt, config, resume_path)
    use_compile = device.type == "cuda" if args.compile is None else args.compile

    if distributed:
        # torchrun's agent keeps its key-value store across restarts (--max_restarts): without a prefix per attempt,
        # a restarted rank can read a dead peer's address left over from the attempt before and never connect
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls autocast leaves
        torch.backends.cudnn.allow_tf32 = True
    amp_ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    # ---- model and optimizer: identical init on every rank from --seed, then per-rank randomness
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["loader"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world_size:
            set_rng_state(ckpt["rng"][rank])
        else:
            print0(f"checkpoint was written by {len(ckpt['rng'])} ranks, this run has {world_size}: reseeding")
            torch.manual_seed(args.seed + 7919 * step + rank)
        print0(f"resumed from {resume_path} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)
    fast_model = torch.compile(model) if use_compile else model  # evaluation shares the compiled graph
    train_model = fast_model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            fast_model, device_ids=[local_rank] if device.type == "cuda" else None)

    tokens_per_step = args.total_batch_size
    n_params = model.num_params()
    flops_per_step = flops_per_token(config, args.seq_len, n_params) * tokens_per_step
    peak_flops = device_peak_flops(device, dtype, args.peak_tflops) if master else None
    # A probed peak is only the best matmul seen at startup, on a machine that may have been busy then; a step that
    # beats it shows the device can do more, so it becomes the peak and MFU stays a fraction of what is possible.
    peak_is_probed = device.type == "cpu" and not args.peak_tflops
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        rewrite_log(log_path, step if ckpt is not None else None)
        print0(f"model {args.model}: {n_params:,} parameters | device {device} | dtype {str(dtype)[6:]} | "
               f"compile {use_compile} | world size {world_size}")
        print0(f"batch {tokens_per_step:,} tokens = {args.batch_size} x {args.seq_len} x {world_size} ranks x "
               f"{grad_accum} micro-steps | {len(train_loader.stream):,} train tokens | "
               f"fused AdamW {optimizer.defaults.get('fused')}")

    def log(record: dict) -> None:
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(record: dict) -> None:
        """Validation loss, HellaSwag and a sample, as the flags ask; every rank takes part."""
        last = step == args.max_steps
        fast_model.eval()
        if val_stream is not None and (step % args.val_every == 0 or last):
            val_loss, n_tokens = evaluate_loss(fast_model, val_stream, args.batch_size, args.seq_len, args.val_tokens,
                                               device, amp_ctx, rank, world_size)
            record["val_loss"] = val_loss
            print0(f"step {step:5d} | val loss {val_loss:.4f} over {n_tokens:,} tokens")
        if hellaswag_examples is not None and (step % args.hellaswag_every == 0 or last):
            import hellaswag_eval
            # eager model: the ragged HellaSwag batches would make a compiled graph recompile for every shape
            result = hellaswag_eval.evaluate(model, hellaswag_examples, device,
                                             rank=rank, world_size=world_size, autocast_dtype=dtype)
            record["hellaswag_acc_norm"] = result["acc_norm"]
            print0(f"step {step:5d} | hellaswag acc_norm {result['acc_norm']:.4f} over {result['n']} examples")
        fast_model.train()
        if args.sample_every and step > 0 and (step % args.sample_every == 0 or last):
            text = sample_text(model, args.prompt, args.sample_tokens, args.top_k, args.seed + rank, device, amp_ctx)
            print0(f"step {step:5d} | sample: {text!r}")

    def save() -> None:
        rngs = [None] * world_size
        if distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"refusing to save step {step}: the weights are not finite; resume from an earlier checkpoint")
        if master:
            path = checkpoint_path(args.out_dir, step)
            # read back before the rename (memory-mapped, so cheap): an unreadable file never replaces a good one
            verify = lambda tmp: torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)  # noqa: E731
            try:
                with atomic_write(path, verify=verify) as f:
                    torch.save({
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "step": step, "loader": train_loader.state_dict(),
                        "rng": rngs, "config": asdict(config), "args": vars(args),
                    }, f)
            except OSError as e:
                raise UserError(f"could not write {path} ({e.strerror or e}); the earlier checkpoints are intact: "
                                "free some space, then continue with --resume auto") from None
            print0(f"step {step:5d} | saved {path}")
            if args.keep_last:
                for old in list_checkpoints(args.out_dir)[:-args.keep_last]:
                    os.remove(old)

    if ckpt is None and (val_stream is not None or hellaswag_examples is not None):
        record = {"step": 0, "tokens": 0}
        evaluate(record)
        log(record)
    del ckpt  # the optimizer and model hold copies; the checkpoint's tensors need not stay in memory

    stop_at = min(args.max_steps, args.stop_at_step or args.max_steps)
    preempted = PreemptionFlag()
    try:
        bad_steps = 0
        while step < stop_at:
            t0 = time.perf_counter()
            lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(grad_accum):
                x, y = train_loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # gradients are all-reduced once, on the last micro-step, not after every backward
                sync = not distributed or micro_step == grad_accum - 1
                with nullcontext() if sync else train_model.no_sync():
                    with amp_ctx:
                        _, loss = train_model(x, y)
                    loss = loss / grad_accum  # the mean over micro-steps, as one large batch would give
                    loss_sum += loss.detach()
                    scaler.scale(loss).backward()
            if distributed:
                dist.all_reduce(loss_sum)
                loss_sum /= world_size
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            # every rank sees the same all-reduced loss and gradients, so every rank makes the same decision here;
            # with fp16, overflowing gradients are the GradScaler's business (it skips the step and lowers the scale)
            train_loss, grad_norm = loss_sum.item(), grad_norm.item()
            finite = math.isfinite(train_loss) and (scaler.is_enabled() or math.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)
                bad_steps = 0
            else:
                bad_steps += 1
                print0(f"step {step + 1:5d} | non-finite loss or gradient norm: update skipped ({bad_steps} in a row)")
                if bad_steps >= args.max_bad_steps:
                    raise UserError(f"stopping at step {step + 1}: {bad_steps} steps in a row had a non-finite loss or "
                                    "gradient norm; lower --lr or resume from an earlier checkpoint")
            scaler.update()
            synchronize(device)
            dt = time.perf_counter() - t0
            step += 1

            if peak_is_probed and peak_flops:
                peak_flops = max(peak_flops, flops_per_step / dt / world_size)
            mfu = flops_per_step / dt / (peak_flops * world_size) if peak_flops else None
            record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": step * tokens_per_step, "dt_ms": 1000 * dt, "tok_per_s": tokens_per_step / dt, "mfu": mfu}
            print0(f"step {step:5d}/{args.max_steps} | loss {record['train_loss']:.4f} | lr {lr:.2e} | "
                   f"norm {record['grad_norm']:.3f} | {1000 * dt:.1f} ms | {record['tok_per_s']:,.0f} tok/s"
                   + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""))
            evaluate(record)
            log(record)
            stop_now = preempted.agreed(device, distributed)
            if (args.save_every and step % args.save_every == 0) or step == stop_at or stop_now:
                save()
            if stop_now:
                print0(f"step {step:5d} | stopping after {preempted.name or 'a signal to another rank'}; continue with --resume auto")
                break
    finally:
        preempted.restore()

    if distributed:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain GPT-2 on uint16 token shards (one CPU, one GPU, or torchrun).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2", help=f"size preset: {', '.join(PRESETS)}")
    g.add_argument("--n_layer", type=int, default=None, help="override the preset's number of transformer blocks")
    g.add_argument("--n_head", type=int, default=None, help="override the preset's number of attention heads")
    g.add_argument("--n_embd", type=int, default=None, help="override the preset's width (residual stream size)")
    g.add_argument("--block_size", type=int, default=None, help="override the longest context (1024 in all presets)")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data/edu_fineweb10B",
                   help="folder of *train* and *val* shards (.bin from prepare_fineweb.py or llm.c, or .npy)")
    g.add_argument("--seq_len", type=int, default=1024, help="tokens per training sequence (T)")
    g.add_argument("--batch_size", type=int, default=64, help="sequences per micro-batch per rank (B)")
    g.add_argument("--total_batch_size", type=int, default=524288,
                   help="tokens per optimizer step over all ranks; grad accumulation makes up the rest")
    g = p.add_argument_group("optimization")
    g.add_argument("--max_steps", type=int, default=19073, help="optimizer steps; the LR schedule ends here")
    g.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    g.add_argument("--warmup_steps", type=int, default=715, help="steps of linear learning-rate warmup")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay on matrices and embeddings")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, data order is fixed; runs are repeatable")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision; auto = bf16 where supported, else fp16 with a GradScaler on CUDA")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off otherwise)")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: a GPU table, or a matmul probe on CPU)")
    g = p.add_argument_group("evaluation and sampling")
    g.add_argument("--val_every", type=int, default=250, help="validation loss every N steps (0 = never)")
    g.add_argument("--val_tokens", type=int, default=10_485_760,
                   help="validation budget in tokens: the same sequences whatever the batch or world size")
    g.add_argument("--hellaswag_every", type=int, default=0, help="HellaSwag accuracy every N steps (0 = never)")
    g.add_argument("--hellaswag_limit", type=int, default=None, help="evaluate only the first N HellaSwag examples")
    g.add_argument("--hellaswag_file", default=None,
                   help="local HellaSwag val jsonl (default: download once and cache)")
    g.add_argument("--sample_every", type=int, default=1000, help="print a sample every N steps (0 = never)")
    g.add_argument("--prompt", default="Hello, I'm a language model,", help="text the samples continue")
    g.add_argument("--sample_tokens", type=int, default=32, help="tokens per sample")
    g.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--out_dir", default="out", help="checkpoints (ckpt_<step>.pt) and log.jsonl go here")
    g.add_argument("--save_every", type=int, default=1000,
                   help="checkpoint every N steps (0 = only the final one)")
    g.add_argument("--resume", default=None,
                   help="'auto' continues from the newest checkpoint in --out_dir (or starts fresh); or a .pt path")
    g.add_argument("--keep_last", type=int, default=0,
                   help="keep only the newest K checkpoints (0 = keep all)")
    g.add_argument("--max_bad_steps", type=int, default=5,
                   help="stop after this many steps in a row with a non-finite loss or gradient norm (each skipped)")
    g.add_argument("--stop_at_step", type=int, default=None,
                   help="save and stop after this step without changing the LR schedule (for time-limited jobs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        if is_master():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
