"""
HellaSwag (validation split, 10,042 examples) for GPT-2-style language models, completion style.

Each example is a context and four candidate endings. For every ending the model scores the tokens of
" " + ending after the tokens of the context, and we compare three picks against the human label:
  acc             the ending with the lowest summed loss over its tokens
  acc_norm        the ending with the lowest mean loss per token (llm.c's and build-nanogpt's acc_norm)
  acc_norm_chars  the ending with the lowest summed loss per character of the ending, counted as a Python string
                  without the leading space (lm-evaluation-harness's acc_norm: it divides each choice's
                  log-likelihood by len(choice); on ASCII text characters and UTF-8 bytes are the same count)
Published numbers for OpenAI's GPT-2, full validation set, as quoted in the docstring of llm.c's
dev/data/hellaswag.py (also build-nanogpt's hellaswag.py):
                this scoring, raw ctx         lm-evaluation-harness `hellaswag`, zero-shot
                acc     acc_norm              acc     acc_norm
  GPT-2 124M    0.2859  0.2955                0.2892  0.3114
  GPT-2 1558M   0.3842  0.4893                0.4004  0.5089
Compare acc_norm with the left column. lm-eval's numbers differ in two ways: the normalisation (acc_norm_chars
here), and the text: its task prepends the activity label to the context ("Baking cookies: A woman ...
She ..."), capitalises ctx_b and removes WikiHow's " [title]" and other [bracketed] markers. text="lm_eval"
(--text lm_eval) makes that same change (lm_eval_text), so that acc and acc_norm_chars are then computed as
lm-eval computes acc and acc_norm; tests/test_lm_eval.py runs lm-eval itself on both texts and gets the same
numbers, example by example.

Many examples are scored per forward pass: the 4 rows of each example are right-padded to the longest row of
the batch. The model is causal, so positions after a row's last real token cannot change any of its scores.
Examples are sorted by length (longest first) so that a batch holds rows of similar length.

A context that does not fit the model's context window together with an ending is cut from the LEFT (the
oldest context tokens go), by the same amount for all four endings of the example. HellaSwag's examples are far
shorter than GPT-2's 1024 tokens: this matters only for models trained with a short --block_size.

  python hellaswag_eval.py --checkpoint out/d6/ckpt_0000500.pt
  python hellaswag_eval.py --hf_model path/to/gpt2_dir --limit 1000
  python hellaswag_eval.py --hf_model path/to/gpt2_dir --text lm_eval      # lm-eval's text
  torchrun --standalone --nproc_per_node 2 hellaswag_eval.py --checkpoint out/d6/ckpt_0000500.pt
  python hellaswag_eval.py --plot out/d6 out/d6_lr2x --png runs.png

Library use (the trainer calls this inside its loop, on every rank):
  examples = load_examples(data_file)              # once
  result = evaluate(model, examples, device, rank=rank, world_size=world_size)
  result["acc_norm"], result["acc_norm_chars"]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from train_gpt2 import (EOT_TOKEN, GPT2_VOCAB_SIZE, UserError, atomic_write, get_tokenizer, resolve_device,
                        resolve_dtype)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILENAME = "hellaswag_val.jsonl"
NUM_ENDINGS = 4
TEXTS = ("raw", "lm_eval")  # the text that is scored: the file's ctx and endings as they are, or lm_eval_text's
DEFAULT_CONTEXT_LENGTH = 1024  # used when the model does not say how long its context is
DEFAULT_BATCH_SIZE = 16  # examples per forward pass (4 rows each)
DOWNLOAD_TIMEOUT_S = 60

# GPT-2 124M reference lines for plots
GPT2_124M_HELLASWAG_ACC_NORM = 0.2955
GPT2_124M_FINEWEB_VAL_LOSS = 3.29  # OpenAI GPT-2 124M evaluated on a FineWeb validation split


# ----------------------------------------------------------------------------------------------------------------
# data


def cache_dir() -> str:
    """Where the downloaded validation file is kept: $XDG_CACHE_HOME/gpt2-trainer, else ~/.cache/gpt2-trainer."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2-trainer")


def default_data_file() -> str:
    return os.path.join(cache_dir(), HELLASWAG_FILENAME)


def _parse_label(value, where: str) -> int:
    # the original release stores 0..3 as ints; the copy on the HF Hub stores them as strings
    label = value
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label.strip())
    # True/False are ints in Python but never a valid label
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise UserError(f"{where}: label {value!r} is not one of 0, 1, 2, 3")
    return label


def _read_jsonl(path: str, limit: int | None) -> list[dict]:
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
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
                if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
                    raise UserError(f"{where}: endings must be a list of {NUM_ENDINGS} strings")
                example = dict(record)
                example["label"] = _parse_label(record["label"], where)
                examples.append(example)
    except FileNotFoundError:
        raise UserError(f"HellaSwag data file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; expected the HellaSwag jsonl format") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; --data_file takes the path of hellaswag_val.jsonl") from None
    return examples


def download_val(dest: str | None = None, url: str | None = None) -> str:
    """Download the validation jsonl to `dest` (default: the cache) unless it is already there; return its path.

    The file is written under a temporary name, checked, then renamed, so an interrupted download never leaves a
    partial file where the next run would trust it. Concurrent downloaders (e.g. several ranks) are safe.
    """
    dest = dest or default_data_file()
    url = url or HELLASWAG_URL
    if os.path.exists(dest):
        return dest
    tmp = f"{dest}.tmp{os.getpid()}"
    hint = f"pass --data_file PATH to a local copy of {HELLASWAG_FILENAME}"
    try:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            expected = response.headers.get("Content-Length")
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download HellaSwag from {url} ({getattr(e, 'reason', None) or e}); {hint}") from None
    try:
        got = os.path.getsize(tmp)
        if expected is not None and got != int(expected):
            raise UserError(f"the download of {url} was cut short ({got} of {expected} bytes); retry, or {hint}")
        try:
            _read_jsonl(tmp, limit=None)  # never cache something that is not HellaSwag jsonl
        except UserError as e:
            raise UserError(f"{url} did not return HellaSwag jsonl ({e}); {hint}") from None
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load_examples(data_file: str | None = None, limit: int | None = None) -> list[dict]:
    """Read the official HellaSwag validation jsonl (one JSON object per line).

    data_file None: use the cached copy, downloading it once from HELLASWAG_URL. Each returned dict keeps every
    field of its line (ind, activity_label, ctx_a, ctx_b, ctx, split, split_type, label, endings, source_id) with
    `label` as an int (the file may hold it as "2" or 2). limit N keeps the first N examples.
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")
    if data_file is None:
        data_file = download_val()
    return _read_jsonl(data_file, limit)


def _lm_eval_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow's section markers
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def lm_eval_text(example: dict) -> dict:
    """The example with the text lm-evaluation-harness's `hellaswag` task scores: ctx becomes
    activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), and the context and each ending are stripped, have
    " [title]" replaced by ". ", lose every [bracketed] marker and have double spaces made single. Other fields
    are kept; ctx_a, ctx_b and activity_label must be present (they are in the official jsonl)."""
    missing = [k for k in ("activity_label", "ctx_a", "ctx_b") if not isinstance(example.get(k), str)]
    if missing:
        raise UserError(f"the lm_eval text needs the string field(s) {', '.join(missing)} of every example")
    ctx = example["ctx_a"] + " " + example["ctx_b"].capitalize()
    return dict(example, ctx=_lm_eval_clean(example["activity_label"] + ": " + ctx),
                endings=[_lm_eval_clean(e) for e in example["endings"]])


# ----------------------------------------------------------------------------------------------------------------
# tokenisation and batching


def gpt2_tokenize(example: dict) -> tuple[list[int], list[list[int]]]:
    """GPT-2 ids of the context and of " " + each ending, encoded separately (the reference method)."""
    enc = get_tokenizer()
    # an empty context still needs something to predict the first ending token from: <|endoftext|>
    ctx = enc.encode_ordinary(example["ctx"]) or [EOT_TOKEN]
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    return ctx, endings


class _Item:
    """One example's token rows: row i = ctx + endings[i]; the model reads row[:-1] and is scored on the ending.
    chars[i]: the length of ending i's text in characters (at least 1), for acc_norm_chars."""

    __slots__ = ("ctx", "endings", "label", "chars")

    def __init__(self, ctx: list[int], endings: list[list[int]], label: int, chars: list[int]):
        self.ctx, self.endings, self.label, self.chars = ctx, endings, label, chars

    @property
    def input_len(self) -> int:
        return len(self.ctx) + max(len(e) for e in self.endings) - 1


def _prepare(example: dict, index: int, tokenize, max_len: int) -> _Item:
    ctx, endings = tokenize(example)
    ctx, endings = list(ctx), [list(e) for e in endings]
    if len(endings) != NUM_ENDINGS:
        raise ValueError(f"example {index}: expected {NUM_ENDINGS} endings, got {len(endings)}")
    if any(len(e) == 0 for e in endings):
        raise ValueError(f"example {index}: an ending encodes to no tokens, so it cannot be scored")
    if not ctx:
        raise ValueError(f"example {index}: the context encodes to no tokens, so the first ending token cannot be scored")
    longest = max(len(e) for e in endings)
    # the model reads len(ctx) + len(ending) - 1 tokens; keep at most max_len of them, cutting the context on the
    # left by the same amount for every ending
    keep = max_len + 1 - longest
    if keep < 1:
        # an ending longer than the whole context window (only with tiny models): keep one context token and
        # score each ending's first max_len tokens
        keep = 1
        endings = [e[:max_len] for e in endings]
    if len(ctx) > keep:
        ctx = ctx[-keep:]
    # lm-eval's length: the choice without the leading space; an empty ending (scored on the space alone) counts 1
    chars = [max(1, len(e)) for e in example["endings"]]
    return _Item(ctx, endings, _parse_label(example.get("label"), f"example {index}"), chars)


def _plan_batches(items: Sequence[_Item], batch_size: int) -> list[list[int]]:
    """Example indices grouped into batches, longest first, identical on every rank (the sort is stable)."""
    order = sorted(range(len(items)), key=lambda i: -items[i].input_len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _batch_tensors(items: Sequence[_Item], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, targets, mask), each (4 * len(items), T): right-padded inputs, next-token targets, ending positions."""
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


def _logits_of(output) -> torch.Tensor:
    # accept plain logits, (logits, loss) as our GPT returns, or an object with .logits (transformers)
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


def default_autocast_dtype(device) -> torch.dtype:
    """The trainer's choice: bf16 where the hardware has it natively, else fp16 on CUDA, else fp32."""
    return resolve_dtype("auto", torch.device(device))


def _autocast(device, dtype: torch.dtype | None):
    if dtype is None:
        dtype = default_autocast_dtype(device)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _score_batch(model_fn, items: Sequence[_Item], device, autocast_dtype, vocab_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean loss over each ending's tokens: two float64 CPU tensors of shape (len(items), 4)."""
    idx, targets, mask = _batch_tensors(items, device)
    with torch.no_grad():
        with _autocast(device, autocast_dtype):
            logits = _logits_of(model_fn(idx))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(idx.shape):
            raise ValueError(f"model_fn returned logits of shape {tuple(logits.shape)} for input {tuple(idx.shape)}; expected (B, T, V)")
        picked = logits[mask]  # (N, V): only the positions that predict ending tokens
        if vocab_size is not None:
            if picked.size(-1) < vocab_size:
                raise ValueError(f"model_fn returned {picked.size(-1)} logits per position; need at least {vocab_size}")
            picked = picked[:, :vocab_size]
        losses = F.cross_entropy(picked.float(), targets[mask], reduction="none")
    # per-row totals on the CPU in float64 (MPS has no float64); only N small numbers cross over
    mask = mask.cpu()
    sums = torch.zeros(idx.size(0), dtype=torch.float64).index_add_(0, mask.nonzero()[:, 0], losses.cpu().double())
    sums = sums.view(-1, NUM_ENDINGS)
    return sums, sums / mask.sum(dim=1).double().view(-1, NUM_ENDINGS)


def _prepare_all(model_fn, examples, tokenize, max_seq_len, batch_size, text="raw"):
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_seq_len or context_length(model_fn) or DEFAULT_CONTEXT_LENGTH
    tokenize = tokenize or gpt2_tokenize
    if text not in TEXTS:
        raise ValueError(f"text must be one of {', '.join(TEXTS)}, got {text!r}")
    if text == "lm_eval":
        examples = [lm_eval_text(ex) for ex in examples]
    items = [_prepare(ex, i, tokenize, max_len) for i, ex in enumerate(examples)]
    return items, _plan_batches(items, batch_size)


def _chars(items: Sequence[_Item]) -> torch.Tensor:
    return torch.tensor([it.chars for it in items], dtype=torch.float64)


def score(
    model_fn: Callable,
    examples: Sequence[dict],
    device="cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    tokenize: Callable | None = None,
    vocab_size: int | None = GPT2_VOCAB_SIZE,
    text: str = "raw",
) -> dict:
    """Per-example scores in one process, CPU tensors: {"loss_sum": (n, 4), "loss_mean": (n, 4) per token,
    "loss_per_char": (n, 4) per character of the ending, "label": (n,)}; acc, acc_norm and acc_norm_chars pick
    the lowest of each row of loss_sum, loss_mean and loss_per_char."""
    items, batches = _prepare_all(model_fn, examples, tokenize, max_seq_len, batch_size, text)
    loss_sum = torch.empty(len(items), NUM_ENDINGS, dtype=torch.float64)
    loss_mean = torch.empty_like(loss_sum)
    for batch in batches:
        s, m = _score_batch(model_fn, [items[i] for i in batch], device, autocast_dtype, vocab_size)
        loss_sum[batch], loss_mean[batch] = s, m
    return {"loss_sum": loss_sum, "loss_mean": loss_mean, "loss_per_char": loss_sum / _chars(items),
            "label": torch.tensor([it.label for it in items])}


def evaluate(
    model_fn: Callable,
    examples: Sequence[dict],
    device="cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    max_seq_len: int | None = None,
    tokenize: Callable | None = None,
    vocab_size: int | None = GPT2_VOCAB_SIZE,
    text: str = "raw",
) -> dict:
    """HellaSwag accuracy of `model_fn` on `examples`: {"n", "acc", "acc_norm", "acc_norm_chars", "correct",
    "correct_norm", "correct_norm_chars"}.

    acc: lowest summed loss; acc_norm: lowest mean loss per token (llm.c / build-nanogpt); acc_norm_chars: lowest
    summed loss per character of the ending (lm-evaluation-harness's acc_norm). correct*: the counts behind them.

    model_fn(idx) takes a LongTensor (B, T) on `device` and returns logits (B, T, V) with V >= vocab_size (only
    the first vocab_size columns are used); it may also return (logits, loss) or an object with .logits, so a
    GPT, a torch.compile'd GPT or a transformers model can be passed as is. The caller puts it in eval mode.

    batch_size: examples per forward pass (4 rows each).
    autocast_dtype: None picks default_autocast_dtype(device); torch.float32 turns autocast off.
    max_seq_len: the model's context length; None reads it from the model's config (else 1024). Longer inputs
      lose context tokens on the left.
    tokenize(example) -> (ctx_ids, [ending_ids] * 4): defaults to GPT-2 BPE of ctx and " " + ending.
    text: "raw" scores ctx and endings as they are; "lm_eval" first rewrites them as lm-eval's hellaswag task
      does (lm_eval_text).

    Distributed (world_size > 1, torch.distributed initialised): call on every rank with the same examples and
    batch_size. Batches are dealt round-robin, each rank runs the same number of forward passes (a rank short of
    a batch runs a throw-away one, so collectives inside the model line up) and the counts are all-reduced. The
    batches are the same as in one process, so the result equals the single-process result exactly.
    """
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("world_size > 1 needs torch.distributed to be initialised")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    items, batches = _prepare_all(model_fn, examples, tokenize, max_seq_len, batch_size, text)
    mine = batches[rank::world_size]
    passes = math.ceil(len(batches) / world_size)
    correct = correct_norm = correct_chars = n = 0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="hellaswag", unit="ex", dynamic_ncols=True)
    for p in range(passes):
        if p < len(mine):
            batch = [items[i] for i in mine[p]]
            sums, means = _score_batch(model_fn, batch, device, autocast_dtype, vocab_size)
            labels = torch.tensor([it.label for it in batch])
            n += len(batch)
            correct += int((sums.argmin(dim=1) == labels).sum())
            correct_norm += int((means.argmin(dim=1) == labels).sum())
            correct_chars += int(((sums / _chars(batch)).argmin(dim=1) == labels).sum())
        else:
            # this rank has run out of batches: run a throw-away forward so every rank does `passes` of them
            _score_batch(model_fn, [items[i] for i in batches[-1]], device, autocast_dtype, vocab_size)
        if bar is not None:  # the ranks move in step: count every rank's batch of this pass
            bar.update(sum(len(b) for b in batches[p * world_size : (p + 1) * world_size]))
    if bar is not None:
        bar.close()
    if world_size > 1:
        counts = torch.tensor([n, correct, correct_norm, correct_chars], dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        n, correct, correct_norm, correct_chars = (int(v) for v in counts.tolist())
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n, "acc_norm_chars": correct_chars / n,
            "correct": correct, "correct_norm": correct_norm, "correct_norm_chars": correct_chars}


# ----------------------------------------------------------------------------------------------------------------
# models for the command line


def _load_checkpoint(path: str, device: str):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    import pickle

    from train_gpt2 import load_checkpoint_model

    try:
        model = load_checkpoint_model(path, device=device)
    except UserError:
        raise
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"could not load checkpoint {path}: {type(e).__name__}: {first_line}") from None
    model.eval()
    return model, {}


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


def _hf_tokenizer(name: str, local: bool, trust_remote_code: bool = False):
    """The model's own tokenizer when it is not GPT-2's BPE, as a tokenize(example) function; else None."""
    from transformers import AutoTokenizer

    # no tokenizer files next to the weights: GPT-2 BPE is assumed
    if local and not any(os.path.exists(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local, trust_remote_code=trust_remote_code)
    except Exception:  # transformers raises many kinds here (missing files, unknown classes, bad json)
        return None
    if len(tok) < 2:  # an empty placeholder tokenizer
        return None
    probe = "Hello world! It's 3.14 -- naive cafe\n\n  The man can't stop, so he keeps going."
    try:
        same = list(tok(probe, add_special_tokens=False)["input_ids"]) == get_tokenizer().encode_ordinary(probe)
    except Exception:
        same = False
    if same:
        return None

    def tokenize(example: dict) -> tuple[list[int], list[list[int]]]:
        # the context gets the tokenizer's usual special tokens (a BOS, for tokenizers that add one)
        ctx = list(tok(example["ctx"])["input_ids"])
        return ctx, [list(tok(" " + e, add_special_tokens=False)["input_ids"]) for e in example["endings"]]

    return tokenize


def _config_model_type(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_hf(name: str, device: str):
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--hf_model needs the transformers package: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        import huggingface_hub.utils.logging as hub_logging

        hub_logging.set_verbosity_error()  # no retry chatter when the Hub is unreachable
    except ImportError:
        pass
    local = os.path.isdir(name)
    # a Hub name is "model" or "org/model"; anything else that is not a directory is a mistyped path
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)):
        raise UserError(f"--hf_model {name}: no such directory")
    # a custom export of train_gpt2.py carries its model code: trusted only for that model type
    ours = local and _config_model_type(name) == "gpt2_trainer"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local, trust_remote_code=ours)
    except (OSError, ValueError, KeyError) as e:
        if local:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"could not load a causal LM from {name}: {first_line}") from None
        raise UserError(
            f"could not load {name!r} from the Hugging Face Hub (unreachable or unknown model); "
            "download it where the Hub is reachable and pass its local directory to --hf_model"
        ) from None
    model = model.float().to(device).eval()
    tokenize = _hf_tokenizer(name, local, ours)
    vocab = GPT2_VOCAB_SIZE
    if tokenize is not None:
        vocab = None  # the model's own vocabulary: use every logit
    elif model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{name} has a vocabulary of {model.config.vocab_size} tokens and no tokenizer; GPT-2 BPE needs {GPT2_VOCAB_SIZE}")

    def model_fn(idx):
        return model(input_ids=idx, use_cache=False).logits

    return model_fn, {"max_seq_len": context_length(model), "tokenize": tokenize, "vocab_size": vocab}


# ----------------------------------------------------------------------------------------------------------------
# plotting runs


def _read_log(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # e.g. a line still being written by a live run
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def _run_labels(out_dirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) or d for d in out_dirs]
    # two runs called e.g. "d6" in different parents: fall back to the paths as given
    return [os.path.normpath(d) if names.count(name) > 1 else name for d, name in zip(out_dirs, names)]


def plot_runs(out_dirs: Sequence[str], png_path: str) -> dict:
    """Render <out_dir>/log.jsonl of each run into one PNG: loss (left) and HellaSwag acc_norm (right) by step.

    Returns {run label: {"train_loss": points, "val_loss": points, "hellaswag_acc_norm": points}}.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    runs = []
    for d in out_dirs:
        log = d if os.path.isfile(d) and d.endswith(".jsonl") else os.path.join(d, "log.jsonl")
        if not os.path.isfile(log):
            raise UserError(f"no training log at {log}; --plot takes training output directories (--out_dir)")
        runs.append(_read_log(log))
    labels = _run_labels([os.path.dirname(d) if d.endswith(".jsonl") and os.path.isfile(d) else d for d in out_dirs])

    fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary, loss_values = {}, []
    for i, (label, rows) in enumerate(zip(labels, runs)):
        color = colors[i % len(colors)]
        tx, ty = _series(rows, "train_loss")
        vx, vy = _series(rows, "val_loss")
        hx, hy = _series(rows, "hellaswag_acc_norm")
        if tx:
            ax_loss.plot(tx, ty, color=color, alpha=0.35, linewidth=0.8, label=f"{label} train")
        if vx:
            ax_loss.plot(vx, vy, color=color, linewidth=1.8, marker="o", markersize=3, label=f"{label} val")
        if hx:
            ax_hs.plot(hx, hy, color=color, linewidth=1.8, marker="o", markersize=3, label=label)
        loss_values += ty + vy
        summary[label] = {"train_loss": len(tx), "val_loss": len(vx), "hellaswag_acc_norm": len(hx)}

    ax_loss.axhline(GPT2_124M_FINEWEB_VAL_LOSS, color="red", linestyle="--", linewidth=1,
                    label=f"OpenAI GPT-2 (124M) val loss on FineWeb ({GPT2_124M_FINEWEB_VAL_LOSS})")
    if loss_values:
        # the first steps (loss ~11) would flatten everything else: cap the axis a little above the typical values
        ordered = sorted(loss_values)
        top = max(min(ordered[int(0.9 * (len(ordered) - 1))] * 1.15, ordered[-1] + 0.2), GPT2_124M_FINEWEB_VAL_LOSS + 0.3)
        bottom = min(ordered[0], GPT2_124M_FINEWEB_VAL_LOSS) - 0.2
        ax_loss.set_ylim(max(0.0, bottom), top)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)

    ax_hs.axhline(GPT2_124M_HELLASWAG_ACC_NORM, color="red", linestyle="--", linewidth=1,
                  label=f"OpenAI GPT-2 (124M) acc_norm ({GPT2_124M_HELLASWAG_ACC_NORM})")
    ax_hs.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (0.25)")
    ax_hs.set_xlabel("step")
    ax_hs.set_ylabel("acc_norm")
    ax_hs.set_title("HellaSwag")
    ax_hs.grid(alpha=0.3)
    ax_hs.legend(fontsize=8)
    if not any(s["hellaswag_acc_norm"] for s in summary.values()):
        ax_hs.text(0.5, 0.5, "no HellaSwag evaluations in the log(s)", transform=ax_hs.transAxes, ha="center", color="gray")

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    try:
        with atomic_write(png_path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise UserError(f"{message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Evaluate a GPT-2-style model on HellaSwag (validation), or plot training runs.")
    src = p.add_argument_group("model (exactly one)")
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by train_gpt2.py")
    src.add_argument("--hf_model", metavar="NAME_OR_DIR",
                     help="a transformers causal LM: a local directory (or a Hub name, if the Hub is reachable)")
    p.add_argument("--data_file", metavar="PATH",
                   help=f"HellaSwag validation jsonl; default: download once into {default_data_file()}")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N examples")
    p.add_argument("--text", choices=TEXTS, default="raw",
                   help="raw: score ctx and endings as in the file (llm.c, build-nanogpt); lm_eval: first rewrite "
                        "them as lm-evaluation-harness's hellaswag task does (activity label, [title] markers)")
    p.add_argument("--batch_size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"examples per forward pass, 4 rows each (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: cuda if available, else mps, else cpu")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto: bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--out", metavar="FILE.json", help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--plot", nargs="+", metavar="OUT_DIR",
                   help="instead of evaluating: plot <OUT_DIR>/log.jsonl of one or more training runs")
    p.add_argument("--png", default="runs.png", metavar="FILE.png", help="where --plot writes its picture (default runs.png)")
    return p


def _write_json_atomic(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _load_examples_distributed(data_file, limit, rank: int, world_size: int) -> list[dict]:
    # rank 0 downloads; the others wait, then read the cached file (or stop quietly if rank 0 failed)
    if world_size == 1 or data_file is not None:
        return load_examples(data_file, limit)
    ok, error = torch.tensor([1]), None
    if rank == 0:
        try:
            download_val()
        except UserError as e:
            ok, error = torch.tensor([0]), e
    torch.distributed.broadcast(ok, src=0)
    if error is not None:
        raise error
    if not ok.item():
        raise SystemExit(1)
    return load_examples(None, limit)


def run(args) -> dict:
    if args.plot:
        if args.checkpoint or args.hf_model:
            raise UserError("--plot draws training logs; do not combine it with --checkpoint/--hf_model")
        summary = plot_runs(args.plot, args.png)
        print(f"wrote {args.png} ({len(summary)} run{'s' if len(summary) != 1 else ''})")
        return summary
    if bool(args.checkpoint) == bool(args.hf_model):
        raise UserError("pass exactly one of --checkpoint PATH or --hf_model NAME_OR_DIR")

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    distributed = world_size > 1
    if distributed:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        examples = _load_examples_distributed(args.data_file, args.limit, rank, world_size)
        if not examples:
            raise UserError(f"{args.data_file or default_data_file()} holds no examples")
        if args.checkpoint:
            model_fn, extra = _load_checkpoint(args.checkpoint, device)
        else:
            model_fn, extra = _load_hf(args.hf_model, device)
        t0 = time.time()
        result = evaluate(model_fn, examples, device, batch_size=args.batch_size, rank=rank, world_size=world_size,
                          autocast_dtype=dtype, progress=not args.no_progress, text=args.text, **extra)
        seconds = time.time() - t0
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    result.update(
        seconds=round(seconds, 3),
        examples_per_s=round(result["n"] / seconds, 2) if seconds > 0 else None,
        model=args.checkpoint or args.hf_model,
        data_file=args.data_file or default_data_file(),
        text=args.text,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        batch_size=args.batch_size,
        world_size=world_size,
    )
    if rank == 0:
        print(f"hellaswag n={result['n']} acc={result['acc']:.4f} acc_norm={result['acc_norm']:.4f} "
              f"acc_norm_chars={result['acc_norm_chars']:.4f} seconds={seconds:.1f} "
              f"examples/s={result['examples_per_s']}")
        if args.out:
            _write_json_atomic(args.out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
