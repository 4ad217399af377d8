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

The scoring itself lives in train_gpt2.py's evaluation section (the trainer's --hellaswag_every uses it); this
script adds the download, lm-eval's text, the command line and plots. Library use, on every rank:
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
from typing import Callable, Sequence

import torch

from train_gpt2 import (
    GPT2_VOCAB_SIZE,
    HELLASWAG_BATCH_SIZE,
    HELLASWAG_ENDINGS,
    HELLASWAG_FILENAME,
    UserError,
    atomic_write,
    context_length,
    evaluate_hellaswag,
    get_tokenizer,
    hellaswag_batches,
    hellaswag_cache_file,
    hellaswag_chars,
    read_hellaswag,
    resolve_device,
    resolve_dtype,
    score_hellaswag_batch,
)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
TEXTS = ("raw", "lm_eval")  # the text that is scored: the file's ctx and endings as they are, or lm_eval_text's
DEFAULT_BATCH_SIZE = HELLASWAG_BATCH_SIZE
default_data_file = hellaswag_cache_file  # $XDG_CACHE_HOME/gpt2-trainer/hellaswag_val.jsonl, else under ~/.cache
DOWNLOAD_TIMEOUT_S = 60

# GPT-2 124M reference lines for plots
GPT2_124M_HELLASWAG_ACC_NORM = 0.2955
GPT2_124M_FINEWEB_VAL_LOSS = 3.29  # OpenAI GPT-2 124M evaluated on a FineWeb validation split


# ----------------------------------------------------------------------------------------------------------------
# data


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
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download HellaSwag from {url} ({reason}); {hint}") from None
    try:
        got = os.path.getsize(tmp)
        if expected is not None and got != int(expected):
            raise UserError(f"the download of {url} was cut short ({got} of {expected} bytes); retry, or {hint}")
        try:
            read_hellaswag(tmp)  # never cache something that is not HellaSwag jsonl
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
    return read_hellaswag(data_file, limit)


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


# scoring: train_gpt2's, on the text asked for


def default_autocast_dtype(device) -> torch.dtype:
    """The trainer's choice: bf16 where the hardware has it natively, else fp16 on CUDA, else fp32."""
    return resolve_dtype("auto", torch.device(device))


def scored_text(examples: Sequence[dict], text: str) -> list[dict]:
    if text not in TEXTS:
        raise ValueError(f"text must be one of {', '.join(TEXTS)}, got {text!r}")
    return [lm_eval_text(ex) for ex in examples] if text == "lm_eval" else list(examples)


def score_hellaswag(model_fn, examples: list[dict], device="cpu", batch_size: int = HELLASWAG_BATCH_SIZE,
                    autocast_dtype: torch.dtype | None = None, max_seq_len: int | None = None, tokenize=None,
                    vocab_size: int | None = GPT2_VOCAB_SIZE) -> dict:
    """Per-example scores in one process, from the trainer's batches and scoring, as CPU tensors: {"loss_sum": (n, 4),
    "loss_mean": (n, 4) per token, "loss_per_char": (n, 4) per character of the ending, "label": (n,)}; acc,
    acc_norm and acc_norm_chars pick the lowest of each row of loss_sum, loss_mean and loss_per_char."""
    items, batches = hellaswag_batches(model_fn, examples, tokenize, max_seq_len, batch_size)
    loss_sum = torch.empty(len(items), HELLASWAG_ENDINGS, dtype=torch.float64)
    loss_mean = torch.empty_like(loss_sum)
    for batch in batches:
        loss_sum[batch], loss_mean[batch] = score_hellaswag_batch(model_fn, [items[i] for i in batch], device,
                                                                  autocast_dtype, vocab_size)
    return {"loss_sum": loss_sum, "loss_mean": loss_mean, "loss_per_char": loss_sum / hellaswag_chars(items),
            "label": torch.tensor([it.label for it in items])}


def score(model_fn: Callable, examples: Sequence[dict], *args, text: str = "raw", **kwargs) -> dict:
    """score_hellaswag (per-example losses) on the text asked for: "raw" or "lm_eval" (lm_eval_text)."""
    return score_hellaswag(model_fn, scored_text(examples, text), *args, **kwargs)


def evaluate(model_fn: Callable, examples: Sequence[dict], *args, text: str = "raw", **kwargs) -> dict:
    """train_gpt2.evaluate_hellaswag (acc, acc_norm, acc_norm_chars; distributed if asked) on the text asked for."""
    return evaluate_hellaswag(model_fn, scored_text(examples, text), *args, **kwargs)


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
        raise UserError(f"{name} has a vocabulary of {model.config.vocab_size} tokens and no tokenizer; "
                        f"GPT-2 BPE needs {GPT2_VOCAB_SIZE}")

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


def _read_runs(out_dirs: Sequence[str]) -> tuple[list[str], list[list[dict]]]:
    """Each run's label and log rows: an --out_dir (its log.jsonl) or a log.jsonl path."""
    runs = []
    for d in out_dirs:
        log = d if os.path.isfile(d) and d.endswith(".jsonl") else os.path.join(d, "log.jsonl")
        if not os.path.isfile(log):
            raise UserError(f"no training log at {log}; --plot takes training output directories (--out_dir)")
        runs.append(_read_log(log))
    folders = [os.path.dirname(d) if d.endswith(".jsonl") and os.path.isfile(d) else d for d in out_dirs]
    return _run_labels(folders), runs


def _style_loss_axis(ax, loss_values: list[float]) -> None:
    ax.axhline(GPT2_124M_FINEWEB_VAL_LOSS, color="red", linestyle="--", linewidth=1,
               label=f"OpenAI GPT-2 (124M) val loss on FineWeb ({GPT2_124M_FINEWEB_VAL_LOSS})")
    if loss_values:
        # the first steps (loss ~11) would flatten everything else: cap the axis a little above the typical values
        ordered = sorted(loss_values)
        typical = min(ordered[int(0.9 * (len(ordered) - 1))] * 1.15, ordered[-1] + 0.2)
        top = max(typical, GPT2_124M_FINEWEB_VAL_LOSS + 0.3)
        bottom = min(ordered[0], GPT2_124M_FINEWEB_VAL_LOSS) - 0.2
        ax.set_ylim(max(0.0, bottom), top)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _style_hellaswag_axis(ax, any_points: bool) -> None:
    ax.axhline(GPT2_124M_HELLASWAG_ACC_NORM, color="red", linestyle="--", linewidth=1,
               label=f"OpenAI GPT-2 (124M) acc_norm ({GPT2_124M_HELLASWAG_ACC_NORM})")
    ax.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (0.25)")
    ax.set_xlabel("step")
    ax.set_ylabel("acc_norm")
    ax.set_title("HellaSwag")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if not any_points:
        ax.text(0.5, 0.5, "no HellaSwag evaluations in the log(s)", transform=ax.transAxes, ha="center",
                color="gray")


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
    labels, runs = _read_runs(out_dirs)
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
    _style_loss_axis(ax_loss, loss_values)
    _style_hellaswag_axis(ax_hs, any(s["hellaswag_acc_norm"] for s in summary.values()))
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
                   help="autocast dtype; auto: bf16 where native, fp16 on older GPUs, else fp32 (as train_gpt2.py)")
    p.add_argument("--out", metavar="FILE.json", help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--download", action="store_true",
                   help="instead of evaluating: fetch the validation file into --data_file or the cache (what the "
                        "trainer's --hellaswag_every reads by default), and exit")
    p.add_argument("--plot", nargs="+", metavar="OUT_DIR",
                   help="instead of evaluating: plot <OUT_DIR>/log.jsonl of one or more training runs")
    p.add_argument("--png", default="runs.png", metavar="FILE.png",
                   help="where --plot writes its picture (default runs.png)")
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
    if args.download:
        if args.checkpoint or args.hf_model or args.plot:
            raise UserError("--download only fetches the data; run the evaluation or the plot as a second command")
        path = download_val(args.data_file)
        print(f"HellaSwag validation data: {path}")
        return {"data_file": path}
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
