"""
Per-GPU memory of training the GPT-2 presets: when plain DDP (every GPU holds everything) fits a 24, 40 or 80 GB
card, and when FSDP (parameters, gradients and AdamW state sharded over W GPUs) is needed.

  python benchmarks/memory_table.py                                   # B=8, T=1024, FSDP over 8 GPUs
  python benchmarks/memory_table.py --batch_size 16 --world_size 4
  python benchmarks/memory_table.py --check                           # the formula against measurements

Everything in the table is arithmetic, so it runs in a blink on any machine:

  model state     16 bytes/parameter: fp32 weights, fp32 gradients, AdamW's exp_avg and exp_avg_sq
  DDP             + 4 bytes/parameter of gradient buckets (gradient_as_bucket_view=False keeps them apart)
  FSDP            16/W bytes/parameter, plus the root (embeddings, final norm) gathered in fp32 from forward to
                  backward with its unsharded gradients, plus up to three blocks' fp32 parameters/gradients in flight
  activations     the bytes autograd saves (a formula whose constants were measured by counting saved tensors in a
                  bf16-autocast forward of the real model), the bf16 copies autocast makes of every weight matrix,
                  and the temporaries of the loss, at whichever of the forward and backward peaks is higher

`--check` measures the saved-tensor constants again on tiny configurations (seconds on a CPU), fits them, compares
the formula with configurations the fit did not see, and, where this torch has its (private) memory trackers,
follows one full-size training step on fake tensors (shapes only, nothing computed) and compares the peak.

Units are GiB (2^30 bytes). A card counts as 24, 40 or 80 GiB, of which 90% is usable (--headroom): the CUDA
context, NCCL's buffers and the caching allocator's fragmentation take the rest. The figures are for eager mode
(--no-compile): torch.compile, the trainer's default on CUDA, changes what is saved and is not measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_gpt2 as t  # noqa: E402

GIB = 2**30
CARDS_GIB = (24, 40, 80)
TABLE_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

STATE_BYTES = 16  # per parameter: fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq
DDP_BUCKET_BYTES = 4  # per parameter: DDP all-reduces flat fp32 buckets that are separate from each .grad
FP32 = 4  # FSDP gathers our fp32 parameters (no MixedPrecisionPolicy: autocast does the casting)
COPY_BYTES = 2  # per weight-matrix parameter: the bf16 copy autocast makes for the matmul (measured, see --check)

# Bytes autograd saves in one training forward under bf16 autocast, per unit of each feature in saved_features().
# Measured by counting saved tensors (measure_saved); `--check` fits them again from scratch. Why each value:
SAVED_BYTES: dict[str, float] = {
    # per block and position, times n_embd: both LayerNorms keep their fp32 input (4 + 4); in bf16 the c_attn input
    # (2), q|k|v (6: one tensor, attention keeps views of it), the attention output, which is also c_proj's input
    # (2: flash attention writes it in the layout c_proj reads), and the c_fc input (2)
    "layer_embd": 20,
    "layer_hidden": 4,  # times mlp_hidden: the GELU's bf16 input and output (the second is c_proj's input)
    "layer_head": 4,  # times n_head: the fp32 log-sum-exp flash attention keeps per query and head for its backward
    "layer_token": 16,  # fp32 mean and 1/std of both LayerNorms
    "ckpt_embd": 4,  # with activation checkpointing a block keeps only its input: the fp32 residual stream
    "position": 8,  # per position (not per sequence): the int64 ids the position-embedding lookup keeps
    # head with the logits materialised, per position: the final LayerNorm's fp32 input and lm_head's bf16 input
    # (4 + 2) times n_embd; int64 token ids, fp32 LayerNorm statistics and int64 targets (8 + 8 + 8); the fp32
    # log-probabilities (4 per logit); and the loss's fp32 total weight (one scalar)
    "embd": 6, "token": 24, "vocab": 4, "scalar": 4,
    # head with the chunked loss (the trainer's default): it takes the gradients in the forward, so it keeps the
    # final LayerNorm's fp32 input and the fp32 gradient of it (4 + 4) times n_embd, token ids and LayerNorm
    # statistics (8 + 8), and the fp32 gradient of the head matrix (4 per vocab x n_embd), but never any logits
    "chunked_embd": 8, "chunked_token": 16, "chunked_head_matrix": 4,
}
FEATURES = tuple(SAVED_BYTES)

# Temporaries at the forward and backward peaks beyond the saved tensors, in bytes per logit (B x T x vocab) unless
# said otherwise: read off torch's memory tracker following full-size steps on fake tensors (see --check).
LOGITS_HELD = 2  # the bf16 logits the forward returns: the training loop's `_` keeps them through the backward
LOGITS_FP32 = 4  # logits.float(), alive while log_softmax writes the log-probabilities beside it
CE_BACKWARD = 8  # fp32 gradients of the log-probabilities and of the logits, both alive inside log_softmax's backward
FINAL_NORM_OUT = 4  # per position x n_embd: the final LayerNorm's fp32 output, alive while the head runs
CHUNK_LIVE = 6  # per position x vocab of a chunk: fp32 logits (softmax in place) and their bf16 gradient
CHUNKED_BACKWARD = 4  # per vocab x n_embd and per position x n_embd: the saved fp32 gradients, scaled into new tensors


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every stored parameter, the tied matrix once, padding rows included: what memory holds
    gpt2: int  # without the padding rows, as GPT-2 (and GPT.num_params) counts them
    matrix: int  # every Linear weight including lm_head: what autocast copies to bf16
    block: int  # one Block: what FSDP gathers at a time
    block_matrix: int  # one Block's Linear weights
    root: int  # everything outside the blocks (embeddings, final norm): FSDP's root unit


def check_supported(config: t.GPTConfig) -> None:
    """The formulas follow GPT-2's architecture; the modern options change what is saved."""
    extras = {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "dropout": 0.0}
    odd = [f"{k}={getattr(config, k)}" for k, v in extras.items() if getattr(config, k) != v]
    if config.n_kv_head != config.n_head:
        odd.append(f"n_kv_head={config.n_kv_head}")
    if odd:
        raise ValueError(f"the memory formulas cover GPT-2's architecture only, not {', '.join(odd)}")


def param_counts(config: t.GPTConfig) -> ParamCounts:
    check_supported(config)
    C, H, V, b = config.n_embd, config.mlp_hidden, config.padded_vocab_size, int(config.bias)
    qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    block_matrix = C * qkv + C * C + C * H + H * C
    block = block_matrix + b * (qkv + C + H + C) + 2 * (1 + b) * C  # + biases + two LayerNorms
    heads = 1 if config.tie_embeddings else 2
    root = heads * V * C + config.block_size * C + (1 + b) * C
    total = config.n_layer * block + root
    padding = heads * (V - config.vocab_size) * C
    return ParamCounts(total=total, gpt2=total - padding, matrix=config.n_layer * block_matrix + V * C,
                       block=block, block_matrix=block_matrix, root=root)


def saved_features(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool,
                   chunked: bool) -> dict[str, float]:
    """What each SAVED_BYTES constant multiplies; their dot product is the bytes saved, weight copies aside."""
    L, C, H, V = config.n_layer, config.n_embd, config.mlp_hidden, config.padded_vocab_size
    BT = batch_size * seq_len
    f = dict.fromkeys(FEATURES, 0.0)
    if checkpointing:
        f["ckpt_embd"] = L * BT * C
    else:
        f.update(layer_embd=L * BT * C, layer_hidden=L * BT * H, layer_head=L * BT * config.n_head, layer_token=L * BT)
    f["position"] = seq_len
    if chunked:
        f.update(chunked_embd=BT * C, chunked_token=BT, chunked_head_matrix=V * C)
    else:
        f.update(embd=BT * C, token=BT, vocab=BT * V, scalar=1)
    return f


def saved_bytes(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool, chunked: bool,
                constants: dict[str, float] = SAVED_BYTES) -> float:
    f = saved_features(config, batch_size, seq_len, checkpointing, chunked)
    return sum(constants[k] * v for k, v in f.items())


def saved_copy_bytes(config: t.GPTConfig, checkpointing: bool, chunked: bool) -> float:
    """bf16 weight copies autograd keeps until the backward: each matmul saves the copy it multiplied by. A
    checkpointed block saves nothing; the chunked loss runs its matmuls outside autograd."""
    n = param_counts(config)
    head = 0 if chunked else config.padded_vocab_size * config.n_embd
    blocks = 0 if checkpointing else config.n_layer * n.block_matrix
    return COPY_BYTES * (blocks + head)


def activation_phases(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool,
                      chunked: bool) -> tuple[float, float, float]:
    """Bytes beyond the model state at the three candidate peaks: the end of the forward (as the loss is computed),
    the loss's backward, and a block's backward."""
    n = param_counts(config)
    C, V = config.n_embd, config.padded_vocab_size
    BT = batch_size * seq_len
    S = saved_bytes(config, batch_size, seq_len, checkpointing, chunked)
    # autocast caches the bf16 copy of every weight until the autocast block exits, checkpointed or not, so the
    # forward's peak holds all of them; by the backward only the copies autograd saved are left
    forward = S + COPY_BYTES * n.matrix + FINAL_NORM_OUT * BT * C
    backward = S + saved_copy_bytes(config, checkpointing, chunked)
    if chunked:
        rows = min(getattr(t, "LOSS_CHUNK_ROWS", 1024), BT)
        # the previous chunk's tensors are freed only when their names rebind, so two chunks overlap; within one, the
        # input gradient multiplies by a fresh bf16 cast of the head matrix
        live_chunks = 2 if BT > rows else 1
        forward += max(live_chunks * CHUNK_LIVE * rows * V, CHUNK_LIVE * rows * V + COPY_BYTES * V * C)
        loss_backward = backward + CHUNKED_BACKWARD * (V * C + BT * C)
    else:
        forward += (LOGITS_HELD + LOGITS_FP32) * BT * V
        loss_backward = backward + (LOGITS_HELD + CE_BACKWARD) * BT * V
    one_block = saved_bytes(replace(config, n_layer=1), batch_size, seq_len, False, chunked) - saved_bytes(
        replace(config, n_layer=0), batch_size, seq_len, False, chunked)
    # a block's backward is bounded here by its own saved activations in temporaries (the tracker measures less);
    # with checkpointing the block is first recomputed, saving its activations and bf16 weight copies again
    block_backward = backward + one_block + (one_block + COPY_BYTES * n.block_matrix if checkpointing else 0)
    return forward, loss_backward, block_backward


def activation_peak(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool, chunked: bool) -> float:
    return max(activation_phases(config, batch_size, seq_len, checkpointing, chunked))


@dataclass(frozen=True)
class Estimate:
    state: float  # model state on this GPU
    extra: float  # DDP's buckets, or what FSDP holds unsharded at the peak
    activations: float

    @property
    def total(self) -> float:
        return self.state + self.extra + self.activations


def per_gpu(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool, chunked: bool,
            mode: str, world_size: int = 1) -> Estimate:
    """Peak bytes one GPU holds in a training step: mode "single" (one GPU), "ddp" or "fsdp" over world_size."""
    n = param_counts(config)
    phases = activation_phases(config, batch_size, seq_len, checkpointing, chunked)
    if mode == "single":
        return Estimate(STATE_BYTES * n.total, 0, max(phases))
    if mode == "ddp":
        return Estimate(STATE_BYTES * n.total, DDP_BUCKET_BYTES * n.total, max(phases))
    if mode != "fsdp":
        raise ValueError(f"mode must be single, ddp or fsdp, not {mode}")
    # FSDP2 does not reshard the root after forward, so its fp32 parameters stay gathered into the backward. In the
    # forward a block runs while the next is gathered; the loss's backward runs while the last block is gathered;
    # from the head's backward on, the root's gradients stay unsharded until the backward ends, and one block's
    # unsharded gradients wait for their reduce-scatter while the next block is gathered
    gathered = (FP32 * (n.root + 2 * n.block), FP32 * (n.root + n.block), FP32 * (2 * n.root + 3 * n.block))
    extra, act = max(zip(gathered, phases), key=sum)
    return Estimate(STATE_BYTES * n.total / world_size, extra, act)


def smallest_card(total_bytes: float, headroom: float) -> int | None:
    return next((gib for gib in CARDS_GIB if total_bytes <= gib * GIB * (1 - headroom)), None)


def cell(total_bytes: float, headroom: float) -> str:
    card = smallest_card(total_bytes, headroom)
    return f"{total_bytes / GIB:.1f} → {card}" if card else f"{total_bytes / GIB:.1f} ✗"


def table(presets: list[str], batch_size: int, seq_len: int, world_size: int, headroom: float,
          chunked: bool) -> str:
    W = world_size
    lines = [f"| model | params (M) | weights + grads + AdamW | activations | activations, AC | DDP | DDP + AC "
             f"| FSDP ×{W} | FSDP ×{W} + AC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in presets:
        config = t.model_config(name)
        n = param_counts(config)
        act = [activation_peak(config, batch_size, seq_len, ac, chunked) for ac in (False, True)]
        totals = [per_gpu(config, batch_size, seq_len, ac, chunked, mode, W).total
                  for mode in ("ddp", "fsdp") for ac in (False, True)]
        lines.append(f"| `{name}` | {n.gpt2 / 1e6:.0f} | {STATE_BYTES * n.total / GIB:.1f} | {act[0] / GIB:.1f} | "
                     f"{act[1] / GIB:.1f} | " + " | ".join(cell(x, headroom) for x in totals) + " |")
    return "\n".join(lines)


def legend(batch_size: int, seq_len: int, headroom: float, chunked: bool) -> str:
    usable = ", ".join(f"{g * (1 - headroom):.1f}" for g in CARDS_GIB)
    loss = "chunked loss (the default)" if chunked else "--no-chunked_loss"
    return (f"GiB per GPU at --batch_size {batch_size} --seq_len {seq_len}, bf16 autocast, fused AdamW, {loss}, "
            f"eager. AC = --activation_checkpointing. `→ n`: the smallest card of 24/40/80 GiB it fits with "
            f"{headroom:.0%} headroom (usable {usable} GiB); ✗: none.")


# ----------------------------------------------------------------------------------------------------------------
# measurement


VIEW_OR_CAST = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0",
                "ExpandBackward0", "UnsafeViewBackward0"}


def is_parameter_copy(grad_fn) -> bool:
    """Whether a saved tensor is a cast (and views) of a parameter: autocast's bf16 copy of a weight, which scales
    with the parameters, not the batch, so it is counted apart from activations."""
    cast = False
    while grad_fn is not None and type(grad_fn).__name__ in VIEW_OR_CAST:
        cast |= type(grad_fn).__name__ == "ToCopyBackward0"
        inputs = [fn for fn, _ in grad_fn.next_functions if fn is not None]
        if len(inputs) != 1:
            return False
        grad_fn = inputs[0]
    return cast and grad_fn is not None and isinstance(getattr(grad_fn, "variable", None), torch.nn.Parameter)


def measure_saved(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool, chunked: bool,
                  seed: int = 0) -> tuple[int, int]:
    """(activation bytes, bf16 weight-copy bytes) autograd saves in one training forward of the real model under
    bf16 autocast on this CPU, with targets so the loss is included. Tensors count once per storage (q, k and v are
    views of one); parameters and views of them are not activations."""
    torch.manual_seed(seed)
    model = t.GPT(config)
    model.activation_checkpointing = checkpointing
    model.chunked_loss = chunked
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        # every saved tensor stays alive until the graph is dropped, so an address cannot be reused meanwhile
        if storage.nbytes() and storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (storage.nbytes(), is_parameter_copy(x.grad_fn))
        return x

    idx = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    targets = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    del loss
    activations = sum(nbytes for nbytes, copy in seen.values() if not copy)
    return activations, sum(nbytes for nbytes, copy in seen.values() if copy)


def tiny(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab: int = 256, mlp_hidden: int | None = None,
         block_size: int = 256) -> t.GPTConfig:
    # a small padded vocabulary keeps the emulated-bf16 head cheap; its bytes scale with it all the same
    return t.GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab - 6, padded_vocab_size=vocab,
                       mlp_hidden=mlp_hidden, block_size=block_size)


# (config, B, T, checkpointing, chunked): rows move one size at a time from the base (one moves depth and width
# together, to tell per-block terms from the head's), so the design matrix has full rank
FIT_RUNS = [
    *[(c, b, s, False, False) for c, b, s in [
        (tiny(), 1, 32), (tiny(n_layer=3), 1, 32), (tiny(n_embd=128), 1, 32), (tiny(n_layer=3, n_embd=128), 1, 32),
        (tiny(n_head=4), 1, 32), (tiny(mlp_hidden=384), 1, 32), (tiny(), 2, 32), (tiny(), 1, 64),
        (tiny(vocab=512), 1, 32)]],
    *[(c, 1, 32, True, chunked) for c in (tiny(), tiny(n_layer=3), tiny(n_embd=128)) for chunked in (False, True)],
    *[(c, b, s, False, True) for c, b, s in [
        (tiny(), 1, 32), (tiny(n_layer=3), 1, 32), (tiny(n_embd=128), 1, 32), (tiny(vocab=512), 1, 32),
        (tiny(), 2, 32), (tiny(), 1, 64)]],
]

# configurations the fit never sees: other widths, head counts, lengths and the real 50,304-entry vocabulary
HELD_OUT = [
    *[(tiny(n_layer=3, n_embd=192, n_head=3, vocab=640), 2, 96, ac, chunked)
      for ac in (False, True) for chunked in (False, True)],
    *[(t.GPTConfig(n_layer=2, n_embd=128, n_head=2, block_size=256), 1, 64, False, chunked)
      for chunked in (False, True)],
]


def describe(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool, chunked: bool) -> str:
    return (f"L={config.n_layer} C={config.n_embd} heads={config.n_head} H={config.mlp_hidden} "
            f"V={config.padded_vocab_size} B={batch_size} T={seq_len}" + (" AC" if checkpointing else "")
            + (" chunked" if chunked else ""))


def fit_constants(runs: list) -> tuple[dict[str, float], float, int]:
    """Least-squares constants from measured runs, the fitted bytes per weight-copy parameter, and the design
    matrix's rank (it must equal the number of constants for the fit to mean anything)."""
    rows, measured, copy_ratios = [], [], []
    for config, B, T, ac, chunked in runs:
        activations, copies = measure_saved(config, B, T, ac, chunked)
        f = saved_features(config, B, T, ac, chunked)
        rows.append([f[k] for k in FEATURES])
        measured.append(activations)
        expected_copies = saved_copy_bytes(config, ac, chunked) / COPY_BYTES
        if expected_copies:
            copy_ratios.append(copies / expected_copies)
    A, y = np.array(rows, dtype=np.float64), np.array(measured, dtype=np.float64)
    scale = A.max(axis=0)  # the features span six orders of magnitude: scale columns so lstsq is well conditioned
    solution, *_ = np.linalg.lstsq(A / scale, y, rcond=None)
    fitted = dict(zip(FEATURES, solution / scale))
    return fitted, float(np.mean(copy_ratios)), int(np.linalg.matrix_rank(A / scale))


# ----------------------------------------------------------------------------------------------------------------
# full-size check on fake tensors, through torch's private memory trackers


@contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of world_size ranks inside this one process whose collectives move nothing: enough for
    FSDP2 to shard, gather and reduce fake tensors with the right shapes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tracked_peak(config: t.GPTConfig, batch_size: int, seq_len: int, checkpointing: bool, chunked: bool,
                 fsdp: bool, world_size: int) -> float:
    """Peak bytes of one training micro-step (forward and backward) of the full-size model, as torch's memory
    tracker follows it on fake tensors: the trainer's model, its sharding and its AdamW, with the gradients and
    AdamW state already there (a warm-up step first, and zero_grad keeping the gradients, as on every micro-step
    after a step's first). The optimizer step is left out: fused AdamW updates in place, yet on fake DTensors the
    tracker reports tens of times the sharded AdamW state there, which we could not reconcile, so it is not compared."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,)) if fsdp else None  # a mesh reads real rank ids: not on fakes
    with FakeTensorMode():
        model = t.GPT(config)
        model.activation_checkpointing = checkpointing
        model.chunked_loss = chunked
        if fsdp:  # as train_gpt2.shard_model does: every Block, then the root
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = t.adamw(list(model.parameters()), 6e-4, 0.1, "cpu")
        idx = torch.randint(0, config.vocab_size, (batch_size, seq_len))
        targets = torch.randint(0, config.vocab_size, (batch_size, seq_len))

        def micro_step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(idx, targets)  # as the training loop does: `_` holds the logits through backward
            loss.backward()

        micro_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        tracker = FSDPMemTracker(model, optimizer) if fsdp else MemTracker()
        if not fsdp:
            tracker.track_external(model, optimizer)
        with tracker:
            micro_step()
        return float(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def check(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    fitted, copy_bytes, rank = fit_constants(FIT_RUNS)
    print(f"fit: {len(FIT_RUNS)} tiny configurations, bf16 autocast, {rank} of {len(FEATURES)} constants "
          f"determined ({time.perf_counter() - t0:.1f} s)\n")
    print("| constant | fitted (bytes) | in the formula |\n|---|---:|---:|")
    for k in FEATURES:
        print(f"| {k} | {fitted[k]:.3f} | {SAVED_BYTES[k]:g} |")
    print(f"| bf16 copy per weight-matrix parameter | {copy_bytes:.3f} | {COPY_BYTES:g} |")
    worst = max(abs(fitted[k] - SAVED_BYTES[k]) for k in FEATURES)
    print(f"\nlargest difference between fitted and formula constants: {worst:.2g} bytes\n")

    print("held out (not in the fit): measured / formula\n")
    print("| configuration | saved activations (MiB) | ratio | off by (bytes) | bf16 weight copies (MiB) | ratio |\n"
          "|---|---:|---:|---:|---:|---:|")
    for config, B, T, ac, chunked in HELD_OUT:
        activations, copies = measure_saved(config, B, T, ac, chunked)
        predicted = saved_bytes(config, B, T, ac, chunked)
        predicted_copies = saved_copy_bytes(config, ac, chunked)
        copy_ratio = f"{copies / predicted_copies:.4f}" if predicted_copies else ("exact" if not copies else "n/a")
        print(f"| {describe(config, B, T, ac, chunked)} | {activations / 2**20:.2f} | {activations / predicted:.4f} | "
              f"{activations - predicted:+.0f} | {copies / 2**20:.2f} | {copy_ratio} |")

    if not args.check_model:
        return
    config = t.model_config(args.check_model)
    B, T, W = args.batch_size, args.seq_len, args.world_size
    print(f"\nfull size, fake tensors: {args.check_model}, B={B}, T={T}; formula / tracked peak "
          "(model state + activations of a micro-step; FSDP per rank)\n")
    print("| setup | tracked (GiB) | formula (GiB) | ratio |\n|---|---:|---:|---:|")
    try:
        with warnings.catch_warnings(), fake_process_group(W):
            warnings.simplefilter("ignore")  # FSDP and the trackers warn about hooks on fake tensors, many times
            for fsdp in (False, True):
                for ac in (False, True):
                    tracked = tracked_peak(config, B, T, ac, args.chunked_loss, fsdp, W)
                    formula = per_gpu(config, B, T, ac, args.chunked_loss, "fsdp" if fsdp else "single", W).total
                    setup = (f"FSDP over {W}" if fsdp else "one GPU (DDP adds its buckets)") + (" + AC" if ac else "")
                    print(f"| {setup} | {tracked / GIB:.2f} | {formula / GIB:.2f} | {formula / tracked:.3f} |",
                          flush=True)
    except ImportError as e:
        print(f"(skipped: this torch lacks the memory trackers the full-size check uses: {e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch per GPU (B)")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (T)")
    p.add_argument("--world_size", type=int, default=8, help="GPUs FSDP shards the model state over (W)")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of each card left for the CUDA context, NCCL and allocator fragmentation")
    p.add_argument("--models", nargs="+", default=list(TABLE_PRESETS), choices=list(t.PRESETS),
                   help="presets to tabulate")
    p.add_argument("--chunked_loss", action=argparse.BooleanOptionalAction,
                   default=t.Settings.chunked_loss,
                   help="assume the trainer's chunked head + cross-entropy (its default), or materialised logits")
    p.add_argument("--check", action="store_true",
                   help="measure the saved-tensor constants on tiny models, fit them, test the formula on held-out "
                        "configurations, and compare full-size peaks from torch's memory tracker on fake tensors")
    p.add_argument("--check_model", default="gpt2", choices=["", *t.PRESETS],
                   help="preset for --check's full-size comparison at --batch_size/--seq_len/--world_size "
                        "('' skips it)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "seq_len", "world_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be positive")
    if not 0 <= args.headroom < 1:
        p.error("--headroom must be in [0, 1)")
    longest = min(t.model_config(name).block_size for name in [*args.models, args.check_model or "gpt2"])
    if args.seq_len > longest:
        p.error(f"--seq_len {args.seq_len} exceeds the presets' block_size {longest}")
    if args.check:
        check(args)
        return
    print(table(args.models, args.batch_size, args.seq_len, args.world_size, args.headroom, args.chunked_loss))
    print()
    print(legend(args.batch_size, args.seq_len, args.headroom, args.chunked_loss))


if __name__ == "__main__":
    main()
