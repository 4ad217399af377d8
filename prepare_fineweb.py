"""
Tokenise a text corpus with GPT-2's BPE into the uint16 token shards that train_gpt2.py reads.

The default turns FineWeb-Edu sample-10BT (~10B tokens) into 100M-token llm.c shards on one machine,
with bounded RAM (one shard buffer), and resumes after an interruption instead of starting over:

  python prepare_fineweb.py                                    # FineWeb-Edu sample-10BT -> data/edu_fineweb10B/
  python prepare_fineweb.py --streaming                        # same, without keeping a copy of the dataset on disk
  python prepare_fineweb.py --resume                           # continue an interrupted run where it stopped
  python prepare_fineweb.py --dataset fineweb                  # FineWeb sample-10BT -> data/fineweb10B/
  python prepare_fineweb.py --data_files 'corpus/*.parquet'    # local parquet / jsonl / txt files -> data/corpus/
  python prepare_fineweb.py --sample                           # bundled Gutenberg corpus (2M tokens) -> data/gutenberg/

Pipeline, top to bottom:
  documents (datasets, in order) -> worker threads (BPE, uint16) -> shard buffer -> <prefix>_{val,train}_NNNNNN.bin
The BPE and the shard format come from gpt2_tokens.py (fastokens' BPE, or tiktoken's where fastokens has no wheel:
the same ids either way); nothing here imports torch or train_gpt2.py, so prep starts in a fraction of a second.
The first --val_tokens tokens form the val split, everything after it the train split. Every document is prefixed
with <|endoftext|> and may continue from one shard into the next. After each shard, prep_state.json records where
the next shard starts (document index and token offset in that document), which is all --resume needs.
"""

from __future__ import annotations

import argparse
import decimal
import glob
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

import gpt2_tokens
from gpt2_tokens import UserError, atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_PATH = os.path.join(HERE, "data", "gutenberg_sample.parquet")

# short names for the two corpora this script is mostly used for: (Hub id, default config, prefix, output directory
# for that config). data/edu_fineweb10B is train_gpt2.py's default --data_dir, so the two commands chain without flags.
KNOWN_DATASETS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "edufineweb", "data/edu_fineweb10B"),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb", "data/fineweb10B"),
}
DEFAULT_DATASET = "fineweb-edu"
DEFAULT_SHARD_SIZE = 100_000_000  # 200 MB per shard, as in llm.c
# the bundled corpus is only ~2M tokens: smaller shards and a 100k-token val split leave ~1.9M tokens to train on
SAMPLE_SHARD_SIZE = 500_000
SAMPLE_VAL_TOKENS = 100_000

# datasets' own builders for local files, chosen by extension (compressed json/txt are decompressed by datasets)
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

STATE_FILE = "prep_state.json"
SUMMARY_FILE = "prep.json"
HUB_TIMEOUT_S = 5  # a reachable Hub answers well within this; an unreachable one should fail fast, not retry
TASK_CHARS = 1 << 20  # text per task, ~30 ms of BPE: the per-task cost vanishes, the last tasks still spread out
TASKS_PER_WORKER = 2  # tasks in flight per thread: keeps threads busy while bounding RAM whatever the corpus size
READ_BATCH = 128  # documents per read from the dataset


# ----------------------------------------------------------------------------------------------------------------
# tokenising: worker threads, as the BPE runs without the GIL. Against worker processes, nothing is pickled or
# piped, and nothing is imported again under `spawn`. With fastokens, each thread runs its own batches through one
# shared BPE (see gpt2_tokens.load_bpe). Handing whole batches from one thread to fastokens' own pool measured as
# fast on two cores, but that pool is sized once per process (a later run's --num_proc could not change it) and its
# caller waits for the slowest document of each batch before it hands over the next.

_bpe: gpt2_tokens.FastokensBPE | gpt2_tokens.TiktokenBPE | None = None
_bpe_lock = threading.Lock()


def get_bpe() -> gpt2_tokens.FastokensBPE | gpt2_tokens.TiktokenBPE:
    """The process's one GPT-2 BPE, built on first use: fastokens' takes ~0.4 s to build."""
    global _bpe
    with _bpe_lock:
        if _bpe is None:
            _bpe = gpt2_tokens.load_bpe()
        return _bpe


def start_building_bpe() -> None:
    """Build the BPE in the background while datasets is imported and the corpus opened: the build releases the
    GIL, so it runs beside them on a second core. A failure here is raised again, in the main thread, by get_bpe."""

    def build() -> None:
        try:
            get_bpe()
        except Exception:  # e.g. a missing ranks file: reported once, as one line, when tokenising starts
            pass

    threading.Thread(target=build, name="bpe-build", daemon=True).start()


def tokenize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise documents, each prefixed with <|endoftext|>, into one uint16 array plus each document's length."""
    return get_bpe().encode_batch(texts)


def tokenize_stream(batches: Iterator[list[str]], num_threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenise batches of documents in worker threads, yielding results in input order. Even one worker thread
    helps: the calling thread reads documents and writes shards meanwhile."""
    bpe = get_bpe()  # a missing ranks file is one error here rather than one per thread
    if isinstance(bpe, gpt2_tokens.TiktokenBPE):
        print(f"warning: {gpt2_tokens.FALLBACK_NOTE}", file=sys.stderr)
    # ThreadPool.imap consumes its input in a background thread without waiting for results; the semaphore makes
    # that thread wait until results are consumed, so at most `limit` batches are in flight however large the corpus.
    limit = TASKS_PER_WORKER * num_threads
    in_flight = threading.Semaphore(limit)
    stop = threading.Event()
    read_error: list[BaseException] = []

    def feed() -> Iterator[list[str]]:
        # runs in the pool's task thread: keep a read error and raise it in the caller once the batches read
        # before it are tokenised, so the shards they complete are written (and --resume continues from them)
        try:
            for batch in batches:
                in_flight.acquire()
                if stop.is_set():
                    return
                yield batch
        except Exception as e:
            read_error.append(e)

    with ThreadPool(num_threads) as pool:
        try:
            # imap, not imap_unordered: output order = document order, so shards do not depend on the thread count.
            # Batches are already sized by text length, hence one batch per task.
            for result in pool.imap(bpe.encode_batch, feed(), chunksize=1):
                yield result
                in_flight.release()
        finally:
            stop.set()  # unblock the feeder so the pool's task thread can exit when the pool is terminated
            for _ in range(limit):
                in_flight.release()
    if read_error:
        raise read_error[0]


# ----------------------------------------------------------------------------------------------------------------
# reading documents


@dataclass
class Source:
    """Where the documents come from, and the defaults that follow from it."""

    description: str  # for messages
    path: str  # first argument of datasets.load_dataset: a Hub id, a local directory or a builder name
    name: str | None
    split: str
    data_files: list[str] | None
    text_column: str
    prefix: str
    out_dir: str
    hub: bool  # needs the Hugging Face Hub


def resolve_source(args: argparse.Namespace) -> Source:
    """Turn --dataset / --data_files / --sample into what load_dataset needs, refusing contradictory flags."""
    if args.sample and (args.dataset or args.data_files or args.name or args.split):
        raise UserError("--sample reads the bundled corpus; it cannot be combined with "
                        "--dataset, --data_files, --name or --split")
    if args.data_files and (args.dataset or args.name or args.split):
        raise UserError("--data_files reads local files; it cannot be combined with --dataset, --name or --split")
    split = args.split or "train"
    if args.sample:
        if not os.path.exists(SAMPLE_PATH):
            raise UserError(f"bundled corpus not found at {SAMPLE_PATH}; "
                            "restore data/gutenberg_sample.parquet from the repository")
        return Source("the bundled Gutenberg corpus", "parquet", None, "train", [SAMPLE_PATH], args.text_column,
                      prefix="gutenberg", out_dir="data/gutenberg", hub=False)
    if args.data_files:
        files = local_files(args.data_files)
        builder = LOCAL_BUILDERS[file_kind(files[0])]
        return Source(f"--data_files {args.data_files}", builder, None, "train", files, args.text_column,
                      prefix="corpus", out_dir="data/corpus", hub=False)
    dataset = args.dataset or DEFAULT_DATASET
    hub_id, name, prefix, out_dir = dataset, args.name, None, None
    for short, (known_id, known_config, known_prefix, known_dir) in KNOWN_DATASETS.items():
        if dataset in (short, known_id):
            # the full FineWebs are 15T / 1.3T tokens: without --name, mean the 10B-token sample
            hub_id, name, prefix = known_id, args.name or known_config, known_prefix
            out_dir = known_dir if name == known_config else None
    if prefix is None:
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(hub_id.rstrip("/"))).lower() or "corpus"
    if out_dir is None:
        out_dir = os.path.join("data", prefix + (f"_{name}" if name else ""))
    description = hub_id + (f" ({name})" if name else "")
    return Source(description, hub_id, name, split, None, args.text_column, prefix, out_dir,
                  hub=not os.path.exists(hub_id))


def file_kind(path: str) -> str:
    """The extension that picks the datasets builder, ignoring a compression suffix (.jsonl.gz -> .jsonl)."""
    base = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return os.path.splitext(base)[1]


def local_files(pattern: str) -> list[str]:
    """The files a --data_files glob names, sorted so that document order never depends on the filesystem."""
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"--data_files {pattern!r} matches no files")
    kinds = sorted({file_kind(f) for f in files})
    unknown = [k or "(none)" for k in kinds if k not in LOCAL_BUILDERS]
    if unknown:
        raise UserError(f"--data_files {pattern!r} includes files with extension {', '.join(unknown)}; "
                        "supported: .parquet, .jsonl, .json, .txt (optionally .gz/.bz2/.xz/.zst)")
    if len({LOCAL_BUILDERS[k] for k in kinds}) > 1:
        raise UserError(f"--data_files {pattern!r} mixes {', '.join(kinds)} files; prepare one kind at a time")
    # files with no documents add nothing, and datasets' parquet reader fails on a zero-row file: leave them out
    files = [f for f in files if not is_empty_file(f)]
    if not files:
        raise UserError(f"--data_files {pattern!r}: every matching file is empty; there is nothing to tokenise")
    return files


def is_empty_file(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    if file_kind(path) == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise UserError(f"{path} is not a readable parquet file ({one_line(e)})") from None
    return False


LOCAL_HINT = "use local files with --data_files GLOB (parquet/jsonl/txt) or the bundled corpus with --sample"


def check_hub_reachable(source: Source) -> None:
    """Fail in seconds, with a way out, when the Hub cannot be reached (huggingface_hub would retry for ~30 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # offline mode: datasets loads from its cache, and says so when the dataset is not there
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT_S)
    except urllib.error.HTTPError:
        return  # the Hub answered, even if not with 200
    except (urllib.error.URLError, OSError) as e:
        reason = one_line(getattr(e, "reason", e))
        raise UserError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) to load {source.description}; "
            f"{LOCAL_HINT} (with HF_HUB_OFFLINE=1, a dataset already in the local cache loads without the Hub)"
        ) from None


def hub_unavailable(e: BaseException) -> bool:
    """Whether a load failed for want of the Hub: no connection, or something other than the Hub answering (a proxy
    or captive portal) with nothing cached. datasets re-raises these as plain FileNotFoundError / ConnectionError,
    so look through the whole chain of exceptions."""
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_documents(source: Source, streaming: bool, cache_dir: str | None) -> Any:
    """Open the corpus with datasets (a memory-mapped Dataset, or an IterableDataset with --streaming)."""
    if source.hub:
        check_hub_reachable(source)
    import datasets  # imported here so that pool workers, which only tokenise, never import it

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures reach the user as our one-line errors
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # keep logs and captured stderr readable; our own bar shows progress
    kwargs: dict[str, Any] = {"split": source.split, "streaming": streaming, "cache_dir": cache_dir}
    if source.data_files:
        kwargs["data_files"] = source.data_files
    if source.path == "text":
        kwargs["sample_by"] = "document"  # a .txt file is one document (a book, an article), not one per line
    try:
        ds = datasets.load_dataset(source.path, source.name, **kwargs)
        columns = ds.column_names
        if columns is None:  # a streamed dataset may only know its columns once read
            first = next(iter(ds.take(1)), None)
            columns = list(first) if first is not None else []
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        from huggingface_hub import constants

        if source.hub and constants.HF_HUB_OFFLINE and hub_unavailable(e):
            raise UserError(f"HF_HUB_OFFLINE is set and {source.description} is not in the local cache, "
                            f"so it needs the Hugging Face Hub; {LOCAL_HINT}") from None
        if source.hub and hub_unavailable(e):
            raise UserError(f"could not get {source.description} from the Hugging Face Hub at {constants.ENDPOINT}, "
                            f"and it is not in the local cache; {LOCAL_HINT}") from None
        raise UserError(f"cannot load {source.description}: {one_line(root_cause(e))}") from None
    if not columns or (not streaming and len(ds) == 0):
        raise UserError(f"{source.description} has no documents; there is nothing to tokenise")
    if source.text_column not in columns:
        raise UserError(f"{source.description} has no column {source.text_column!r}; "
                        f"its columns are {', '.join(columns)} (pick one with --text_column)")
    return ds


def iter_texts(ds: Any, source: Source, start: int) -> Iterator[str]:
    """Document texts in corpus order, from document index `start` on (how --resume skips what is already done)."""
    import datasets

    if start:
        ds = ds.skip(start)
    doc = start
    try:
        for batch in ds.select_columns([source.text_column]).iter(batch_size=READ_BATCH):
            for text in batch[source.text_column]:
                yield text or ""  # a missing text is an empty document: keeps document indices aligned with the corpus
                doc += 1
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        # a lost connection or a corrupt file: the shards written so far stay valid
        raise UserError(f"reading {source.description} failed after document {doc}: {one_line(root_cause(e))}; "
                        "fix the cause and rerun with --resume to continue") from None


def batch_texts(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Group documents into pool tasks of about `max_chars` characters (a huge document is a task of its own)."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------------------
# output directory and progress state


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.bin"


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON via a temporary file and a rename, so a crash leaves either the old file or the new one."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def own_files(out_dir: str, prefix: str) -> list[tuple[str, int | None]]:
    """The files this script writes in out_dir for `prefix`, with the shard index for shards (None otherwise)."""
    shard = re.compile(rf"{re.escape(prefix)}_(?:val|train)_(\d{{6,}})\.bin")
    found = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        base = re.sub(r"\.tmp\d+$", "", name)  # leftovers of a write that was killed
        m = shard.fullmatch(base)
        if m and base == name:
            found.append((name, int(m.group(1))))
        elif m or base in (STATE_FILE, SUMMARY_FILE):
            found.append((name, None))
    return found


def fingerprint(source: Source, args: argparse.Namespace) -> dict:
    """Everything that decides the bytes of the shards: a resumed run must agree on all of it."""
    files = [{"path": f, "bytes": os.path.getsize(f)} for f in source.data_files] if source.data_files else None
    return {
        "dataset": source.path if not source.data_files else None,
        "name": source.name,
        "split": source.split,
        "data_files": files,
        "text_column": source.text_column,
        "prefix": args.prefix,
        "shard_size": args.shard_size,
        "val_tokens": args.val_tokens,
        "tokenizer": "gpt2",
    }


def new_state(config: dict) -> dict:
    # `resume` is where a continuation starts: the first shard that is not full-size (a final partial shard is
    # rewritten when a later run goes further), with the document and the token offset that shard starts at
    return {"config": config, "shards": [], "resume": {"shard": 0, "doc": 0, "offset": 0},
            "documents": 0, "complete": False, "max_tokens": None}


def load_state(out_dir: str, config: dict, max_tokens: int | None) -> dict:
    """Read and check the progress state of an earlier run in out_dir, for --resume."""
    path = os.path.join(out_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
        recorded = state["config"]
        kept = state["shards"][: state["resume"]["shard"]]
        done = sum(s["tokens"] for s in kept)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume: {path} is unreadable ({one_line(e)}); start again with --overwrite") from None
    for key, value in config.items():
        if recorded.get(key) != value:
            raise UserError(f"cannot resume: {out_dir} was prepared with {key}={recorded.get(key)!r}, this run has "
                            f"{key}={value!r}; use the same settings, or --overwrite to start again")
    check_shards(out_dir, kept)
    if max_tokens is not None and max_tokens < done:
        raise UserError(f"--max_tokens {max_tokens} is below the {done} tokens already in {out_dir}; "
                        "use --overwrite to prepare fewer")
    return state


def check_shards(out_dir: str, shards: list[dict]) -> None:
    for shard in shards:
        path = os.path.join(out_dir, shard["file"])
        if not os.path.exists(path) or len(gpt2_tokens.read_shard(path)) != shard["tokens"]:
            raise UserError(f"cannot resume: {path} is missing or differs from {STATE_FILE}; "
                            "start again with --overwrite")


def other_shards(out_dir: str, prefix: str) -> list[str]:
    """Token files in out_dir that are not ours: train_gpt2.py would read them along with ours."""
    own = {name for name, _ in own_files(out_dir, prefix)}
    return [f for f in sorted(os.listdir(out_dir))
            if f.endswith((".bin", ".npy")) and ("train" in f or "val" in f) and f not in own]


def nothing_left(state: dict, max_tokens: int | None) -> bool:
    """Whether a completed earlier run already produced everything this run asks for."""
    if not state["complete"]:
        return False
    if state["max_tokens"] is None:  # the corpus was exhausted
        total = sum(s["tokens"] for s in state["shards"])
        if max_tokens is not None and max_tokens < total:
            raise UserError(f"--max_tokens {max_tokens} is below the {total} tokens already in the output; "
                            "use --overwrite to prepare fewer")
        return True
    return max_tokens == state["max_tokens"]


def count_by_split(shards: list[dict]) -> dict:
    tokens = {"val": 0, "train": 0}
    files = {"val": 0, "train": 0}
    for s in shards:
        tokens[s["split"]] += s["tokens"]
        files[s["split"]] += 1
    return {"tokens": tokens, "shards": files}


# ----------------------------------------------------------------------------------------------------------------
# packing the token stream into shards


class ShardWriter:
    """Fills one shard buffer with the token stream and writes it out when full: val shards first, then train."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int, val_tokens: int, max_tokens: int | None,
                 state: dict, clear: str):
        self.out_dir, self.prefix = out_dir, prefix
        self.shard_size, self.val_tokens, self.max_tokens = shard_size, val_tokens, max_tokens
        self.state = state
        self.clear = clear  # removed before the first write: "all" our files (--overwrite), or "stale" ones (--resume)
        self.dir_ready = False
        resume = state["resume"]
        self.shards = state["shards"][: resume["shard"]]  # complete, full-size shards kept from an earlier run
        self.written = sum(s["tokens"] for s in self.shards)
        self.documents = resume["doc"] + (1 if resume["offset"] else 0)
        self.start = (resume["doc"], resume["offset"])  # where the shard in the buffer starts
        self.buf = np.empty(shard_size, dtype=np.uint16)  # the only large allocation, whatever the corpus size
        self.fill = 0

    def target(self) -> int:
        """Size of the current shard when full: the val split ends exactly after --val_tokens tokens."""
        if self.written < self.val_tokens:
            return min(self.shard_size, self.val_tokens - self.written)
        return self.shard_size

    def at_max(self) -> bool:
        return self.max_tokens is not None and self.written + self.fill >= self.max_tokens

    def add(self, doc: int, skip: int, tokens: np.ndarray, lengths: np.ndarray) -> bool:
        """Append documents doc, doc + 1, ... (their tokens concatenated, `lengths` each), leaving out the first
        `skip` tokens of the first one; False once --max_tokens is reached. Copies whole runs of documents at once:
        per-document Python work would cost more than the copy for short documents."""
        stream = tokens[skip:]
        starts = np.cumsum(lengths) - lengths - skip  # where each document starts in `stream`
        pos = 0
        while pos < len(stream) and not self.at_max():
            room = self.target() - self.fill
            if self.max_tokens is not None:
                room = min(room, self.max_tokens - self.written - self.fill)
            take = min(room, len(stream) - pos)
            self.buf[self.fill : self.fill + take] = stream[pos : pos + take]
            self.fill += take
            pos += take
            self.documents = max(self.documents, doc + int(np.searchsorted(starts, pos)))  # those begun so far
            if self.fill == self.target():
                # a document that does not fit continues in the next shard, which starts mid-document
                i = int(np.searchsorted(starts, pos, side="right")) - 1  # the document holding stream[pos]
                nxt = (doc + i, int(pos - starts[i])) if pos < len(stream) else (doc + len(lengths), 0)
                self.write(full=True, next_start=nxt)
        return not self.at_max()

    def write(self, full: bool, next_start: tuple[int, int]) -> None:
        self.prepare_dir()
        index = len(self.shards)
        split = "val" if self.written < self.val_tokens else "train"
        name = shard_name(self.prefix, split, index)
        gpt2_tokens.write_shard(os.path.join(self.out_dir, name), self.buf[: self.fill])
        self.shards.append({"file": name, "split": split, "tokens": self.fill})
        self.written += self.fill
        self.fill = 0
        if full:
            # the state goes after the shard: a crash in between only means that shard is written again on resume
            self.state["resume"] = {"shard": len(self.shards), "doc": next_start[0], "offset": next_start[1]}
            self.start = next_start
        self.state["shards"] = self.shards
        self.state["documents"] = self.documents
        write_json_atomic(os.path.join(self.out_dir, STATE_FILE), self.state)

    def finish(self, exhausted: bool) -> None:
        """Write the last, partial shard and mark the output complete."""
        self.state["complete"] = True
        self.state["max_tokens"] = None if exhausted else self.max_tokens
        if self.fill:
            # the resume point stays at this shard's start, so a later run with a larger --max_tokens rewrites it
            self.write(full=False, next_start=self.start)
        elif self.shards:
            self.prepare_dir()
            self.state["shards"], self.state["documents"] = self.shards, self.documents
            write_json_atomic(os.path.join(self.out_dir, STATE_FILE), self.state)

    def prepare_dir(self) -> None:
        # done only when the first shard is ready, so a run that fails earlier (e.g. an empty corpus) changes nothing
        if self.dir_ready:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        keep = len(self.shards)
        for name, index in own_files(self.out_dir, self.prefix):
            stale = (index is None and name != STATE_FILE) or (index is not None and index >= keep)
            if self.clear == "all" or (self.clear == "stale" and stale):
                os.remove(os.path.join(self.out_dir, name))
        self.dir_ready = True


# ----------------------------------------------------------------------------------------------------------------
# the run


def starting_state(args: argparse.Namespace, config: dict) -> tuple[dict, str, bool]:
    """What a run starts from, after checking args.out_dir: the state to continue (--resume) or a new one, which
    files in out_dir the writer clears ("stale", "all" or ""), and whether a resumed run has nothing left to do."""
    out_dir = args.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} exists and is not a directory")
    has_files = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    has_state = os.path.exists(os.path.join(out_dir, STATE_FILE))
    if has_files and (others := other_shards(out_dir, args.prefix)):
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"{out_dir} holds other shards ({listed}) that train_gpt2.py would read along with these; "
                        "choose another --out_dir or remove them")
    if args.resume and has_state:
        state = load_state(out_dir, config, args.max_tokens)
        complete = nothing_left(state, args.max_tokens)
        if complete:
            check_shards(out_dir, state["shards"])
        return state, "stale", complete
    if has_files and args.resume:
        raise UserError(f"cannot resume: {out_dir} is not empty but has no {STATE_FILE}; "
                        "use --overwrite to replace its shards")
    if has_files and not args.overwrite:
        raise UserError(f"{out_dir} is not empty; pass --resume to continue an interrupted run "
                        "or --overwrite to replace it")
    return new_state(config), "all" if has_files else "", False


def prepare(args: argparse.Namespace) -> dict:
    """Tokenise the corpus into shards in args.out_dir; returns the summary that is also saved as prep.json."""
    t_start = time.time()
    source = resolve_source(args)
    apply_defaults(args, source)
    out_dir = args.out_dir
    state, clear, complete = starting_state(args, fingerprint(source, args))
    if complete:
        summary = summarize(state, source, args, tokens_this_run=0, seconds=time.time() - t_start)
        print(f"{out_dir} is already complete; nothing to do")
        return summary

    start_building_bpe()
    ds = load_documents(source, args.streaming, args.cache_dir)
    t_loaded = time.time()
    writer = ShardWriter(out_dir, args.prefix, args.shard_size, args.val_tokens, args.max_tokens, state, clear)
    first_doc, skip = state["resume"]["doc"], state["resume"]["offset"]
    if first_doc or skip:
        print(f"resuming at shard {state['resume']['shard']}: document {first_doc}, token {skip} of that document")
    already = writer.written
    # delay: a run that fails at once, or is over in a second, prints no bar
    bar = tqdm(total=args.max_tokens, initial=already, unit="tok", unit_scale=True, desc=args.prefix,
               smoothing=0.1, dynamic_ncols=True, delay=1)
    doc = first_doc
    exhausted = True
    results = tokenize_stream(batch_texts(iter_texts(ds, source, first_doc), TASK_CHARS), args.num_proc)
    try:
        for tokens, lengths in results:
            before = writer.written + writer.fill
            going = writer.add(doc, skip, tokens, lengths)
            doc, skip = doc + len(lengths), 0
            bar.update(writer.written + writer.fill - before)
            if not going:
                exhausted = False
                break
    except OSError as e:  # writing failed (e.g. the disk is full); the shards written so far are kept
        raise UserError(f"{one_line(e)} (after {len(writer.shards)} shards; "
                        "fix the cause and rerun with --resume to continue)") from None
    finally:
        results.close()  # stops the worker pool now rather than whenever the generator is garbage-collected
        bar.close()
    if writer.written + writer.fill == 0:
        raise UserError(f"{source.description} has no documents; there is nothing to tokenise")
    writer.finish(exhausted)
    seconds = time.time() - t_loaded
    summary = summarize(state, source, args, tokens_this_run=writer.written - already, seconds=seconds)
    summary["load_seconds"] = round(t_loaded - t_start, 3)
    write_json_atomic(os.path.join(out_dir, SUMMARY_FILE), summary)
    if summary["tokens"]["train"] == 0:
        larger = " or a larger --max_tokens" if args.max_tokens else ""
        print(f"warning: all {summary['tokens']['val']} tokens went to the val split; "
              f"pass a --val_tokens below that{larger} to get a train split", file=sys.stderr)
    return summary


def summarize(state: dict, source: Source, args: argparse.Namespace, tokens_this_run: int, seconds: float) -> dict:
    counts = count_by_split(state["shards"])
    return {
        "source": source.description,
        "out_dir": args.out_dir,
        "documents": state["documents"],
        "tokens": {**counts["tokens"], "total": sum(counts["tokens"].values())},
        "shards": counts["shards"],
        "files": [s["file"] for s in state["shards"]],
        "complete": state["complete"],
        "max_tokens": args.max_tokens,
        "tokens_this_run": tokens_this_run,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens_this_run / seconds) if seconds > 0 else 0,
        "num_proc": args.num_proc,
    }


def apply_defaults(args: argparse.Namespace, source: Source) -> None:
    """Fill in the settings whose defaults depend on the corpus, then check the flags."""
    if args.shard_size is None:
        args.shard_size = SAMPLE_SHARD_SIZE if args.sample else DEFAULT_SHARD_SIZE
    if args.val_tokens is None:
        args.val_tokens = SAMPLE_VAL_TOKENS if args.sample else args.shard_size
    args.prefix = args.prefix or source.prefix
    args.out_dir = args.out_dir or source.out_dir
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.prefix):
        raise UserError(f"--prefix {args.prefix!r} may only use letters, digits, '_', '.' and '-'")
    for word in ("train", "val"):
        # train_gpt2.py finds a split's shards by the split name in the file name
        if word in args.prefix:
            raise UserError(f"--prefix {args.prefix!r} contains {word!r}, which would mix the splits when "
                            "train_gpt2.py looks for shards; pick another with --prefix")
    if not 0 < args.shard_size < 2**31:  # the shard header stores the token count as an int32
        raise UserError(f"--shard_size must be between 1 and {2**31 - 1} tokens, got {args.shard_size}")
    if args.val_tokens < 0:
        raise UserError(f"--val_tokens must be 0 or more, got {args.val_tokens}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max_tokens must be at least 1, got {args.max_tokens}")
    if args.num_proc < 1:
        raise UserError(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def root_cause(e: BaseException) -> BaseException:
    # datasets wraps reader failures ("An error occurred while generating the dataset"); the cause says what is wrong
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------
# command line


def token_count(text: str) -> int:
    """argparse type for token counts: 100000000, 100_000_000, 1e8, 100M, 10B."""
    s = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(s[-1:].lower(), 1)
    if scale != 1:
        s = s[:-1]
    try:
        value = decimal.Decimal(s) * scale
    except decimal.InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 100000000, 1e8, 100M)") from None
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(value)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other user error, instead of usage + error
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Tokenise a corpus (FineWeb-Edu sample-10BT by default) into GPT-2 uint16 shards "
                           "for train_gpt2.py.")
    src = p.add_argument_group("input")
    src.add_argument("--dataset", help="Hugging Face dataset id, or a short name: fineweb-edu "
                     "(the default: HuggingFaceFW/fineweb-edu) or fineweb (HuggingFaceFW/fineweb)")
    src.add_argument("--name", help="dataset config (default: sample-10BT for the FineWebs, none otherwise)")
    src.add_argument("--split", help="dataset split to read (default: train)")
    src.add_argument("--text_column", default="text", help="column holding the document text (default: text)")
    src.add_argument("--data_files", metavar="GLOB", help="local files instead of the Hub: .parquet, .jsonl/.json "
                     "(one document per record) or .txt (one document per file); quote the glob; ** recurses")
    src.add_argument("--sample", action="store_true", help="use the bundled Gutenberg corpus "
                     f"({os.path.relpath(SAMPLE_PATH)}, ~2M tokens): works offline, defaults to "
                     f"{SAMPLE_SHARD_SIZE:,}-token shards and a {SAMPLE_VAL_TOKENS:,}-token val split")
    src.add_argument("--streaming", action="store_true", help="read the dataset as a stream instead of first "
                     "downloading it and converting it to Arrow files (tens of GB for sample-10BT); "
                     "--resume then re-reads the documents it skips")
    src.add_argument("--cache_dir", help="where datasets keeps downloads and converted files "
                     "(default: HF_DATASETS_CACHE or ~/.cache/huggingface/datasets)")
    out = p.add_argument_group("output")
    out.add_argument("--out_dir", help="directory for the shards (default: data/edu_fineweb10B, data/fineweb10B, "
                     "data/gutenberg, data/corpus for --data_files, else data/<prefix>)")
    out.add_argument("--prefix", help="shard file name prefix (default: edufineweb, fineweb, gutenberg, "
                     "corpus for --data_files, else the dataset's name)")
    out.add_argument("--shard_size", type=token_count, help="tokens per shard, e.g. 1e8 or 100M "
                     f"(default: 100M, i.e. 200 MB files; {SAMPLE_SHARD_SIZE:,} with --sample)")
    out.add_argument("--val_tokens", type=token_count, help="the first this-many tokens form the val split, the rest "
                     f"the train split (default: one shard; {SAMPLE_VAL_TOKENS:,} with --sample; 0 for no val split)")
    out.add_argument("--max_tokens", type=token_count, help="stop after this many tokens in all: prepares a prefix "
                     "of the corpus (default: all of it)")
    out.add_argument("--num_proc", type=int, default=cpu_count(),
                     help=f"tokeniser threads (default: all cores, here {cpu_count()})")
    out.add_argument("--resume", action="store_true", help="continue an earlier run in --out_dir after its last "
                     "complete shard (also extends a run that stopped at --max_tokens); the output is identical "
                     "to that of an uninterrupted run")
    out.add_argument("--overwrite", action="store_true", help="replace this script's files already in --out_dir "
                     "(shards with the same prefix, progress state, summary)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        summary = prepare(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command with --resume to continue after the last complete shard",
              file=sys.stderr)
        return 130
    t, s = summary["tokens"], summary["shards"]
    print(
        f"{summary['documents']:,} documents, {t['total']:,} tokens: val {t['val']:,} in {plural(s['val'], 'shard')}, "
        f"train {t['train']:,} in {plural(s['train'], 'shard')} -> {summary['out_dir']}"
    )
    if summary["tokens_this_run"]:
        print(f"this run: {summary['tokens_this_run']:,} tokens in {summary['seconds']:.1f} s "
              f"({summary['tokens_per_second']:,} tokens/s, {plural(summary['num_proc'], 'thread')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
