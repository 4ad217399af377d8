"""What several test files share: the repository's paths, the flags of a tiny training run, shard makers, the
trainer's command line run in a forked process (run_cli) or in this process (cli), the one-line-error check, tiny
models and their inputs, a local HTTP server, and session fixtures for shards, documents and a one-step base run.

pytest.ini's `pythonpath` makes the repository root, benchmarks/ and tests/ importable, so a test file imports these
helpers as `from conftest import run_cli, make_shards, TINY`. A child process started by a test finds the
repository through its working directory (`python -c ...` with cwd=ROOT) or through PYTHONPATH (child_env()), never
through code that edits the import path."""

import atexit
import contextlib
import functools
import http.server
import io
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import traceback

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt2_tokens
import train_gpt2 as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt2.py")
HELLASWAG_SAMPLE = os.path.join(ROOT, "tests", "data", "hellaswag_sample.jsonl")  # 13 bundled examples
EOT = tg.EOT_TOKEN

# A tiny run: d2 in fp32 (exactly reproducible on CPU), 2 micro-steps of 4 x 32 tokens per optimizer step.
TINY = ["--model", "d2", "--seq_len", "32", "--batch_size", "4", "--total_batch_size", "256", "--warmup_steps", "1",
        "--lr", "3e-3", "--val_every", "3", "--val_tokens", "1024", "--sample_every", "0", "--dtype", "fp32",
        "--save_every", "0", "--peak_tflops", "1", "--device", "cpu"]
TINY_B, TINY_T, TINY_TOTAL = 4, 32, 256  # TINY's micro-batch, sequence length and tokens per optimizer step
# the Llama-like architecture flags: RMSNorm, RoPE, SwiGLU, no biases, one key/value head
MODERN = ["--norm", "rmsnorm", "--pos", "rope", "--mlp", "swiglu", "--no-bias", "--n_kv_head", "1"]


def child_env(**extra) -> dict:
    """This process's environment with the repository on PYTHONPATH, for a script a child runs from a file."""
    return {**os.environ, "PYTHONPATH": ROOT, **extra}


# ---------------------------------------------------------------------------------------------------------------
# shards


def make_shards(folder, train_sizes=(3000, 2500), val_size=1500, seed=0, vocab=tg.GPT2_VOCAB_SIZE):
    """Random-token shards (t_val_000000.bin, t_train_000001.bin, ...); returns the train stream as one array, for
    independent comparisons."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    gpt2_tokens.write_shard(os.path.join(folder, "t_val_000000.bin"), rng.integers(0, vocab, val_size, dtype=np.uint16))
    parts = []
    for i, n in enumerate(train_sizes, start=1):
        tokens = rng.integers(0, vocab, n, dtype=np.uint16)
        gpt2_tokens.write_shard(os.path.join(folder, f"t_train_{i:06d}.bin"), tokens)
        parts.append(tokens)
    return np.concatenate(parts)


def document_shards(folder, doc_lengths, seed=0, val=600):
    """Shards of documents that each start with <|endoftext|>, every other token unique (its position + 1)."""
    rng = np.random.default_rng(seed)
    stream = []
    for n in doc_lengths:
        stream += [EOT] + [0] * (n - 1)
    stream = np.array(stream, dtype=np.int64)
    body = stream != EOT
    stream[body] = np.arange(1, body.sum() + 1) % 50000 + 1
    os.makedirs(folder, exist_ok=True)
    cut = len(stream) // 2
    gpt2_tokens.write_shard(os.path.join(folder, "d_val_000000.bin"), rng.integers(0, 50000, val, dtype=np.uint16))
    gpt2_tokens.write_shard(os.path.join(folder, "d_train_000001.bin"), stream[:cut].astype(np.uint16))
    gpt2_tokens.write_shard(os.path.join(folder, "d_train_000002.bin"), stream[cut:].astype(np.uint16))
    return stream


def shard_tokens(path):
    """The tokens of an llm.c shard, read here without the trainer: a 256-int32 header, then uint16."""
    return np.fromfile(path, dtype=np.uint16, offset=256 * 4).astype(np.int64)


def expected_tokens(texts) -> tuple[np.ndarray, list[int]]:
    """The token stream prepared shards must hold, from the trainer's tokenizer alone: <|endoftext|> + text, per
    document; and each document's length in tokens."""
    enc = tg.get_tokenizer()
    docs = [[EOT] + enc.encode_ordinary(t) for t in texts]
    return np.array([t for d in docs for t in d], dtype=np.uint16), [len(d) for d in docs]


def shard_bytes(out_dir) -> dict[str, bytes]:
    """Every .bin file of a directory, by name: what two preparations must agree on byte for byte."""
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir)) if f.endswith(".bin")}


def write_jsonl(path, records) -> str:
    """One JSON object per line; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """make_shards' random tokens, 11,000 for training and 3,000 for validation: (folder, train stream). The trainer
    only reads a data directory, so every test may share this one."""
    folder = str(tmp_path_factory.mktemp("shards"))
    train = make_shards(folder, train_sizes=(6000, 5000), val_size=3000)
    return folder, train


@pytest.fixture(scope="session")
def data_dir(shards):
    """The folder of `shards`."""
    return shards[0]


@pytest.fixture(scope="session")
def docs(tmp_path_factory):
    """document_shards of 260 documents of 5 to 89 tokens, with 3,000 validation tokens: what --bos_aligned and
    --recipe speedrun need."""
    folder = str(tmp_path_factory.mktemp("docs"))
    document_shards(folder, np.random.default_rng(3).integers(5, 90, 260), val=3000)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the command line: forked from a server that has imported torch (run_cli), or in this process (cli)


def run_cli(args, env_extra=None, torchrun_procs=0):
    """`python train_gpt2.py ARGS` (or under torchrun) with OMP_NUM_THREADS=1: a finished process's return code,
    stdout and stderr. A single-process run is forked from a server that has already imported torch, so it does not
    spend 7 s importing them again on a 2-core CPU; torchrun's ranks start as real processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    args = [str(a) for a in args]
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}",
               SCRIPT, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = preloaded_server().Process(target=main_as_a_script, args=(args, env, out, err))
        process.start()
        process.join(600)
        if process.is_alive():
            process.kill()
            raise subprocess.TimeoutExpired([SCRIPT, *args], 600)
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess([sys.executable, SCRIPT, *args], process.exitcode, f_out.read(),
                                               f_err.read())


@functools.cache
def preloaded_server() -> multiprocessing.context.BaseContext:
    """A fork server that imports torch, torch._dynamo (every optimizer's first call imports it), train_gpt2 and this
    module (where the forked processes' target lives) once; each run is a fresh process forked from it, which has run
    no torch op and started no thread."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "train_gpt2", __name__])
    # The server is a new interpreter, which imports the preload list by name and skips what it cannot find: it starts
    # with the repository and tests/ on its PYTHONPATH (the forked runs then take this process's import path and
    # environment, as any child does).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))]
                                               + ([saved] if saved else []))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return context


def main_as_a_script(args: list[str], env: dict, stdout_path: str, stderr_path: str) -> None:
    """In the forked process: what `python train_gpt2.py ARGS` does after its imports, with its own environment,
    its output in two files and the exit status the interpreter would give."""
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # the server read the variable before it was set
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = [SCRIPT, *args]
    code = 0
    try:
        tg.main(args)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # an interpreter runs them at exit; os._exit below would skip them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli(argv, main=tg.main):
    """train_gpt2.main(argv) (or another script's main) in this process: (exit code, stdout, stderr), like a
    finished subprocess. The exit code is SystemExit's, or what main returns (0 for None)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv]) or 0
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def ok(result):
    """A finished run that must have exited 0, returned for further checks."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def assert_one_line_error(result, *fragments, code=2):
    """Bad input as every script reports it: exit status `code` (None: any but 0), stderr one line starting
    "error: ", no traceback, each fragment in that line. result: a finished run (run_cli's, cli's, a
    CompletedProcess) or a (returncode, stderr) pair. Returns the line."""
    returncode, stderr = result if isinstance(result, tuple) else (result.returncode, result.stderr)
    if code is None:
        assert returncode != 0, stderr
    else:
        assert returncode == code, (returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# what a run leaves


def read_log(out_dir):
    """log.jsonl's records."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_weights(path):
    """A checkpoint's model state dict."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def ckpt(out, step):
    """The whole checkpoint of `step` in run directory `out`."""
    return torch.load(os.path.join(out, f"ckpt_{step:07d}.pt"), map_location="cpu", weights_only=True)


def optimizer_tensors(saved):
    """Every tensor in a checkpoint's list of optimizer state dicts, keyed by (optimizer, param index, name)."""
    return {(i, pid, k): v for i, sd in enumerate(saved) for pid, st in sd["state"].items()
            for k, v in st.items() if torch.is_tensor(v)}


def schedule(step, warmup, max_steps, ratio=0.1):
    """The documented schedule written out again: linear warmup from 1/warmup, cosine to `ratio`, flat after."""
    if step >= max_steps:
        return ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def block_matrix_names(n_layer):
    """The 2-D weights inside the blocks: what Muon trains."""
    return {f"transformer.h.{i}.{leaf}" for i in range(n_layer)
            for leaf in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}


def val_sequences(data_dir, seq_len, budget):
    """The trainer's validation set, by its definition: the first budget // seq_len windows of seq_len + 1 tokens,
    stride seq_len."""
    val = shard_tokens(os.path.join(data_dir, "t_val_000000.bin"))
    n_seq = min(budget // seq_len, (len(val) - 1) // seq_len)
    return torch.stack([torch.from_numpy(val[i * seq_len: i * seq_len + seq_len + 1]) for i in range(n_seq)])


def mean_loss(logits_fn, seqs, vocab=tg.GPT2_VOCAB_SIZE):
    """Mean next-token cross-entropy over every position of every sequence, one sequence at a time."""
    total = 0.0
    with torch.no_grad():
        for s in seqs:
            logits = logits_fn(s[None, :-1])[0, :, :vocab].double()
            total += F.cross_entropy(logits, s[1:], reduction="sum").item()
    return total / (seqs.shape[0] * (seqs.shape[1] - 1))


# ---------------------------------------------------------------------------------------------------------------
# the process's global state


@contextlib.contextmanager
def kept_global_state():
    """In-process runs seed the global generators, and runs here use one thread: both are put back afterwards."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        torch.set_num_threads(states[3])


@pytest.fixture
def global_state():
    """kept_global_state() around a test; a file applies it to all its tests with
    `pytestmark = pytest.mark.usefixtures("global_state")`."""
    with kept_global_state():
        yield


@pytest.fixture(scope="session")
def base_run(shards, tmp_path_factory):
    """One AdamW step of the default d2 on `shards`: a checkpoint to resume, sample from, and refuse mismatches
    against. Tests copy it (copy_run) before they resume it."""
    out = str(tmp_path_factory.mktemp("base"))
    with kept_global_state():
        ok(cli(TINY + ["--data_dir", shards[0], "--max_steps", 1, "--val_every", 0, "--out_dir", out]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tiny models and their inputs

V, VP = 300, 320  # a small vocabulary and its padded size: the model never predicts ids in [V, VP)
GPT2_V = tg.GPT2_VOCAB_SIZE
NORM_GAINS = ("ln_1.weight", "ln_2.weight", "ln_f.weight")
LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
MODEL_VARIANTS = {
    "classic": {},
    "rope": dict(pos="rope"),
    "modern": dict(LLAMA_STYLE, n_kv_head=1),  # rope + multi-query + swiglu + rmsnorm + no bias
    "untied": dict(tie_embeddings=False),
}


def tiny_config(gpt2_vocab=False, **overrides) -> tg.GPTConfig:
    """2 layers, 4 heads of 16, block_size 64 and the small vocabulary V (padded to VP); gpt2_vocab: GPTConfig's
    own vocabulary sizes instead (GPT-2's 50,257, padded to 50,304). Any field can be overridden."""
    values = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)
    if not gpt2_vocab:
        values.update(vocab_size=V, padded_vocab_size=VP)
    values.update(overrides)
    return tg.GPTConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> tg.GPT:
    """A GPT of tiny_config(**overrides), built after torch.manual_seed(seed), in training mode."""
    torch.manual_seed(seed)
    return tg.GPT(tiny_config(**overrides))


def is_norm_gain(name, p) -> bool:
    return name.endswith(NORM_GAINS)


def is_vector(name, p) -> bool:
    return p.dim() == 1


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2, around_one=is_norm_gain) -> torch.nn.Module:
    """Give every parameter non-trivial values: N(1, std) for those around_one(name, p) picks (by default the
    LayerNorm gains), N(0, std) for the rest, so that a weight loaded into the wrong place, left untransposed or
    ignored changes the output, and attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if around_one(name, p) else noise)
    return model


def small_model(seed: int = 0, std: float = 0.1, **overrides) -> tg.GPT:
    """tiny_model(seed), randomized (seed + 100, std), in eval mode."""
    return randomize_(tiny_model(seed, **overrides), seed=seed + 100, std=std).eval()


def small_gpt2(seed=0, **overrides) -> tg.GPT:
    """A GPT with GPT-2's vocabulary and 2 heads of 32, as initialised after torch.manual_seed(seed), in eval mode."""
    return tiny_model(seed, gpt2_vocab=True, n_head=2, **overrides).eval()


def tokens(shape, seed: int = 0, high: int = V) -> torch.Tensor:
    """Random token ids below `high`, from their own seeded generator."""
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, idx, targets, forward=None, seed=None, chunked=None, autocast_dtype=None):
    """One forward (through `forward`, default the model itself) and backward from cleared gradients: (logits, loss,
    {name: gradient}); the gradients are cleared again afterwards. seed: torch.manual_seed first (dropout's masks);
    chunked: the model's chunked_loss switch; autocast_dtype: under CPU autocast."""
    model.zero_grad(set_to_none=True)
    if chunked is not None:
        model.chunked_loss = chunked
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
        logits, loss = (model if forward is None else forward)(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits, loss.detach(), grads


def quiet_transformers():
    """transformers (the test is skipped without it), its warnings and progress bars off."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ---------------------------------------------------------------------------------------------------------------
# the network, locally


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileServer:
    """A one-file HTTP server on 127.0.0.1 that counts requests; url ends in /hellaswag_val.jsonl."""

    def __init__(self, body: bytes):
        server = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hellaswag_val.jsonl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
