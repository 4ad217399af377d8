"""
GPT-2 tokens without torch: the byte-level BPE that makes them from the bundled ranks, and the llm.c shard files
that hold them. prepare_fineweb.py needs nothing else, so it starts in a fraction of the time an import of
train_gpt2 (and torch with it) takes.

train_gpt2.py keeps its own tiktoken tokenizer (prompts, HellaSwag) and its own shard reader, and imports nothing from
here. The two sides are one contract, held by tests/test_prepare.py: the same constants, the same ids for every text,
and shards written here read back by the trainer token for token.

The BPE is fastokens' where it can be imported (the same ids as tiktoken's, several times faster), else tiktoken's.
"""

from __future__ import annotations

import copy
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BPE_RANKS_PATH = os.path.join(HERE, "data", "gpt2.tiktoken")
EOT_TOKEN = 50256  # <|endoftext|>: prefixed to every document
# GPT-2's own pre-tokenisation pattern: contractions, letters, numbers, punctuation, whitespace
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256  # the header is 256 int32: magic, version, token count, then zeros
HEADER_BYTES = HEADER_INTS * 4

# fastokens sizes its own thread pool by this variable
FASTOKENS_THREADS_VAR = "FASTOKENS_BPE_THREADS"
# one line for the user when fastokens cannot be imported; the cost is benchmarks/bench_prepare.py's, on 2 cores
FALLBACK_NOTE = ("fastokens cannot be imported here, so the GPT-2 BPE is tiktoken's: the same tokens, made 2-3x "
                 "more slowly (pip install fastokens, where a wheel exists for this platform)")


class UserError(Exception):
    """A problem with the user's input: reported as one line and a non-zero exit, never a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# shard files: a header of 256 int32 (magic, version, token count), then the tokens as uint16


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """A file that appears at `path` only once it is complete and on disk (temporary name, fsync, rename): a crash
    or a full disk leaves the previous file, never half of a new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"shard {path} has magic {header[0]} and version {header[1]}, expected {SHARD_MAGIC} "
                        f"and {SHARD_VERSION}: not an llm.c shard of uint16 GPT-2 tokens")
    n_tokens = int(header[2])
    if size != HEADER_BYTES + 2 * n_tokens:
        raise UserError(f"shard {path} is truncated or padded: its header says {n_tokens} tokens, "
                        f"the file holds {(size - HEADER_BYTES) / 2:.0f}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


# ----------------------------------------------------------------------------------------------------------------
# the BPE


def repair_surrogates(text: str) -> str:
    """The text tiktoken's encode_ordinary tokenises when `text` holds surrogates, which UTF-8 cannot encode (a
    JSON escape such as "\\ud800" makes them): a valid pair becomes the character it stands for and a lone
    surrogate becomes U+FFFD. Going through UTF-16 is what does both; any other text comes back unchanged."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def documents_to_stream(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document ids -> one uint16 stream with <|endoftext|> before each document, plus each one's length."""
    lengths = np.fromiter((len(doc) + 1 for doc in docs), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(docs) else 0, dtype=np.uint16)
    tokens[ends - lengths] = EOT_TOKEN
    for doc, end in zip(docs, ends.tolist()):
        tokens[end - len(doc) : end] = doc  # uint32 -> uint16 in the one copy that has to happen anyway
    return tokens, lengths


def flat_to_stream(ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A flat batch (every document's ids concatenated, document i at ids[offsets[i]:offsets[i + 1]]) -> the same
    stream as documents_to_stream, without a Python step per document."""
    n_docs = len(offsets) - 1
    lengths = np.diff(offsets).astype(np.int64) + 1
    tokens = np.empty(len(ids) + n_docs, dtype=np.uint16)
    eot_at = offsets[:-1].astype(np.int64) + np.arange(n_docs)  # each document's ids shift by the EOTs before it
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[eot_at] = False
    tokens[eot_at] = EOT_TOKEN
    tokens[is_text] = ids  # GPT-2's 50,257 ids all fit in uint16
    return tokens, lengths


class FastokensBPE:
    """fastokens' BPE over the bundled ranks. Its flat batch call returns one buffer for a whole batch (no Python
    int per token) and runs the BPE outside the GIL; one instance is shared by all threads, since building one
    takes some 0.4 s."""

    name = "fastokens"

    def __init__(self) -> None:
        import fastokens

        # no special tokens at all: "<|endoftext|>" in a document is ordinary text, as with encode_ordinary
        self._bpe = fastokens.Tokenizer.from_tiktoken(BPE_RANKS_PATH, pattern=GPT2_SPLIT_PATTERN, special_tokens={})

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise documents, each prefixed with <|endoftext|>, into one uint16 array plus each one's length."""
        try:
            ids, offsets = self._bpe.encode_batch_flat(texts, split_special_tokens=True)
        except UnicodeEncodeError:  # surrogates somewhere in the batch: fastokens refuses what tiktoken repairs
            ids, offsets = self._bpe.encode_batch_flat([repair_surrogates(t) for t in texts],
                                                       split_special_tokens=True)
        return flat_to_stream(np.frombuffer(ids, dtype=np.uint32), np.frombuffer(offsets, dtype=np.uint64))

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0][1:].tolist()


class TiktokenBPE:
    """tiktoken's BPE over the bundled ranks, for platforms without a fastokens wheel. One copy per thread: threads
    sharing one instance contend for its regex caches inside tiktoken and lose about 30% of their speed."""

    name = "tiktoken"

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self._base = tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN,
                                       mergeable_ranks=load_tiktoken_bpe(BPE_RANKS_PATH),
                                       special_tokens={"<|endoftext|>": EOT_TOKEN})
        self._local = threading.local()

    def _thread_copy(self) -> Any:
        enc = getattr(self._local, "enc", None)
        if enc is None:
            enc = self._local.enc = copy.copy(self._base)
        return enc

    def _encode_one(self, enc: Any, text: str) -> np.ndarray:
        try:
            # straight from tiktoken's buffer (no list of Python ints); nothing disallowed: the special token's
            # text in a document is ordinary text
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            return enc.encode_to_numpy(repair_surrogates(text), disallowed_special=())

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise documents, each prefixed with <|endoftext|>, into one uint16 array plus each one's length."""
        enc = self._thread_copy()
        return documents_to_stream([self._encode_one(enc, text) for text in texts])

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0][1:].tolist()


def fastokens_importable() -> bool:
    try:
        import fastokens  # noqa: F401
    except ImportError:
        return False
    return True


def check_ranks() -> None:
    if not os.path.exists(BPE_RANKS_PATH):
        raise UserError(f"GPT-2 BPE ranks not found at {BPE_RANKS_PATH}; "
                        "restore data/gpt2.tiktoken from the repository")


def load_bpe() -> FastokensBPE | TiktokenBPE:
    """The GPT-2 BPE: fastokens' where it can be imported, else tiktoken's (FALLBACK_NOTE says what that costs).
    Either is safe to share between threads, each tokenising its own batches. Safe to call from any thread."""
    check_ranks()
    if fastokens_importable():
        # the calling threads are the parallelism: fastokens' own pool (sized by this variable, read once, at its
        # first use in the process) would only put more threads on the same cores
        os.environ[FASTOKENS_THREADS_VAR] = "1"
        return FastokensBPE()
    return TiktokenBPE()
