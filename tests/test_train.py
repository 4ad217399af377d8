"""The training side of train_gpt2.py: shards and loader, validation, the CLI end to end (resume, DDP, bad input)."""

import atexit
import functools
import glob
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import pytest
import torch

import gpt2_tokens
import train_gpt2 as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt2.py")

# A tiny run: d2 in fp32 (exactly reproducible on CPU), 2 micro-steps of 4 x 32 tokens per optimizer step.
TINY = ["--model", "d2", "--seq_len", "32", "--batch_size", "4", "--total_batch_size", "256", "--warmup_steps", "1",
        "--lr", "3e-3", "--val_every", "3", "--val_tokens", "1024", "--sample_every", "0", "--dtype", "fp32",
        "--save_every", "0", "--peak_tflops", "1", "--device", "cpu"]


def make_shards(folder, train_sizes=(3000, 2500), val_size=1500, seed=0, vocab=tg.GPT2_VOCAB_SIZE):
    """Random-token shards; returns the train stream as one array, for independent comparisons."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    gpt2_tokens.write_shard(os.path.join(folder, "t_val_000000.bin"), rng.integers(0, vocab, val_size, dtype=np.uint16))
    parts = []
    for i, n in enumerate(train_sizes, start=1):
        tokens = rng.integers(0, vocab, n, dtype=np.uint16)
        gpt2_tokens.write_shard(os.path.join(folder, f"t_train_{i:06d}.bin"), tokens)
        parts.append(tokens)
    return np.concatenate(parts)


def run_cli(args, env_extra=None, torchrun_procs=0):
    """`python train_gpt2.py ARGS` (or under torchrun) with OMP_NUM_THREADS=1: a finished process's return code,
    stdout and stderr. A single-process run is forked from a server that has already imported torch, so it does not
    spend 7 s importing them again on a 2-core CPU; torchrun's ranks start as real processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}",
               SCRIPT, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    args = [str(a) for a in args]
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
    """A fork server that imports torch, torch._dynamo (every optimizer's first call imports it) and train_gpt2 once;
    each run is a fresh process forked from it, which has run no torch op and started no thread."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "train_gpt2", "test_train"])
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


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    make_shards(folder, train_sizes=(6000, 5000), val_size=3000)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# shards and loader


def test_shard_round_trip_and_npy(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    gpt2_tokens.write_shard(str(tmp_path / "a_train_0.bin"), tokens)
    header = np.fromfile(tmp_path / "a_train_0.bin", dtype=np.int32, count=256)
    assert (header[0], header[1], header[2]) == (20240520, 1, 1000)
    assert np.array_equal(tg.read_shard(str(tmp_path / "a_train_0.bin")), tokens)
    np.save(tmp_path / "b_train_1.npy", tokens[::-1].copy())
    stream = tg.TokenStream(str(tmp_path), "train")
    assert np.array_equal(stream.read(0, 2000), np.concatenate([tokens, tokens[::-1]]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_covers_every_token_once_per_epoch_and_ranks_are_disjoint(tmp_path, world_size):
    # unique token values make every position identifiable; shard sizes are not multiples of anything
    tokens = np.arange(2 * 1237 + 901, dtype=np.uint16)
    gpt2_tokens.write_shard(str(tmp_path / "u_train_1.bin"), tokens[:1237])
    gpt2_tokens.write_shard(str(tmp_path / "u_train_2.bin"), tokens[1237:2 * 1237])
    gpt2_tokens.write_shard(str(tmp_path / "u_train_3.bin"), tokens[2 * 1237:])
    B, T = 3, 16
    loaders = [tg.ShardLoader(str(tmp_path), "train", B, T, r, world_size) for r in range(world_size)]
    steps_per_epoch = (len(tokens) - 1) // (B * T * world_size)
    seen = []
    for _ in range(steps_per_epoch):
        batches = [loader.next_batch() for loader in loaders]
        for x, y in batches:
            assert torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
            seen.append(x.flatten())
        assert len({loader.epoch for loader in loaders}) == 1
    seen = torch.cat(seen).numpy()
    assert len(np.unique(seen)) == len(seen)  # no token twice: ranks are disjoint
    assert np.array_equal(np.sort(seen), tokens[: len(seen)])  # a prefix of the stream, across shard boundaries
    assert len(tokens) - len(seen) < B * T * world_size + 1  # only the tail too short for a step is left out
    # the next step starts epoch 1 on every rank at once, from the first token
    x, _ = loaders[0].next_batch()
    assert all(loader.epoch == 0 for loader in loaders[1:]) and loaders[0].epoch == 1
    assert x.flatten()[0].item() == tokens[0]


def test_loader_state_resumes_the_same_batches(tmp_path):
    make_shards(str(tmp_path))
    a = tg.ShardLoader(str(tmp_path), "train", 2, 40)
    for _ in range(50):
        a.next_batch()
    b = tg.ShardLoader(str(tmp_path), "train", 2, 40)
    b.load_state_dict(a.state_dict())
    for _ in range(80):  # crosses an epoch boundary too
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("damage", ["magic", "truncated", "version", "short"])
def test_corrupt_shards_are_named(tmp_path, damage):
    path = str(tmp_path / "c_train_1.bin")
    gpt2_tokens.write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(open(path, "rb").read())
    if damage == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif damage == "truncated":
        raw = raw[:-10]
    else:
        raw = raw[:100]
    open(path, "wb").write(bytes(raw))
    with pytest.raises(tg.UserError, match="c_train_1.bin"):
        tg.read_shard(path)


def test_token_outside_vocabulary_is_named(tmp_path):
    gpt2_tokens.write_shard(str(tmp_path / "v_train_1.bin"), np.full(500, 60000, dtype=np.uint16))
    loader = tg.ShardLoader(str(tmp_path), "train", 2, 16)
    with pytest.raises(tg.UserError, match="60000"):
        loader.next_batch()


# ---------------------------------------------------------------------------------------------------------------
# validation loss: the same number whatever the batch size or world size


def test_val_loss_independent_of_batch_and_world_size(tmp_path, monkeypatch):
    make_shards(str(tmp_path), val_size=1000, vocab=300)
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=300, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=32))
    model.eval()
    stream = tg.TokenStream(str(tmp_path), "val", vocab_size=300)
    T, budget = 32, 700  # 21 sequences: not a multiple of any batch size below
    # independent: every sequence alone, mean over all tokens
    n_seq = budget // T
    with torch.no_grad():
        losses = []
        for i in range(n_seq):
            buf = torch.from_numpy(stream.read(i * T, T + 1))
            logits, _ = model(buf[None, :-1])
            losses.append(torch.nn.functional.cross_entropy(logits[0], buf[1:], reduction="sum"))
    expected = (torch.stack(losses).sum() / (n_seq * T)).item()
    cpu = torch.device("cpu")
    single, n = tg.evaluate_loss(model, stream, 4, T, budget, cpu, torch.no_grad())
    assert n == n_seq * T and single == pytest.approx(expected, rel=1e-5)
    assert tg.evaluate_loss(model, stream, 5, T, budget, cpu, torch.no_grad())[0] == pytest.approx(expected, rel=1e-5)
    # the split over 3 ranks, with the all-reduce done here: each sequence must be counted exactly once
    monkeypatch.setattr(tg.dist, "all_reduce", lambda tensor: None)
    shares = [tg.evaluate_loss(model, stream, 2, T, budget, cpu, torch.no_grad(), rank=r, world_size=3)
              for r in range(3)]
    assert sum(count for _, count in shares) == n_seq * T
    combined = sum(mean * count for mean, count in shares) / (n_seq * T)
    assert combined == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# end to end through the CLI


def test_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = TINY + ["--data_dir", data_dir, "--max_steps", "6"]
    r = run_cli(common + ["--out_dir", whole])
    assert r.returncode == 0, r.stderr
    r = run_cli(common + ["--out_dir", split, "--stop_at_step", "3"])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(split)) == ["ckpt_0000003.pt", "log.jsonl"]
    r = run_cli(common + ["--out_dir", split, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = load_weights(os.path.join(whole, "ckpt_0000006.pt")), load_weights(os.path.join(split, "ckpt_0000006.pt"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_log(whole), read_log(split)
    keys = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens")
    assert [[rec.get(k) for k in keys] for rec in log_a] == [[rec.get(k) for k in keys] for rec in log_b]
    assert [rec["step"] for rec in log_a] == [0, 1, 2, 3, 4, 5, 6]
    assert {"step", "train_loss", "lr", "grad_norm", "tokens", "dt_ms", "tok_per_s", "mfu"} <= log_a[1].keys()
    assert "val_loss" in log_a[3] and "val_loss" not in log_a[2]
    assert log_a[6]["val_loss"] < log_a[0]["val_loss"]


def test_checkpoint_contents(data_dir, tmp_path):
    out = str(tmp_path / "out")
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "2", "--out_dir", out, "--dtype", "fp16"])
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(os.path.join(out, "ckpt_0000002.pt"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "step", "loader", "rng", "scaler", "config", "settings"} <= ckpt.keys()
    assert ckpt["step"] == 2 and ckpt["settings"]["max_steps"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["scaler"]["scale"] > 0  # fp16 ran with a GradScaler, whose state is kept
    assert ckpt["loader"]["position"] == 2 * 256  # two steps of 256 tokens from the start
    model = tg.load_checkpoint_model(os.path.join(out, "ckpt_0000002.pt"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(np.isfinite(rec["train_loss"]) for rec in read_log(out) if "train_loss" in rec)


def test_ddp_two_processes_equal_one_process(data_dir, tmp_path):
    """2 gloo ranks x 2 micro-steps of 2 sequences == 1 process x 4 micro-steps: the same global batch."""
    common = TINY + ["--data_dir", data_dir, "--max_steps", "2", "--batch_size", "2", "--val_every", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = run_cli(common + ["--out_dir", one])
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli(common + ["--out_dir", two], torchrun_procs=2)
    assert r2.returncode == 0, r2.stderr
    assert "world size 2" in r2.stdout and "2 micro-steps" in r2.stdout and "4 micro-steps" in r1.stdout
    a, b = load_weights(os.path.join(one, "ckpt_0000002.pt")), load_weights(os.path.join(two, "ckpt_0000002.pt"))
    for k in a:  # all-reduce sums in another order: equal up to fp32 rounding
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    la, lb = read_log(one), read_log(two)
    for ra, rb in zip(la, lb):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_data_dir(tmp_path):
    out = tmp_path / "out"
    r = run_cli(TINY + ["--data_dir", str(tmp_path / "nope"), "--max_steps", "1", "--out_dir", str(out)])
    assert_one_line_error(r, "does not exist", "prepare_fineweb.py")
    assert not out.exists()


def test_corrupt_header_on_the_cli(tmp_path):
    make_shards(str(tmp_path / "d"))
    path = tmp_path / "d" / "t_train_000002.bin"
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(1).tobytes()
    path.write_bytes(bytes(raw))
    r = run_cli(TINY + ["--data_dir", str(tmp_path / "d"), "--max_steps", "1", "--out_dir", str(tmp_path / "o")])
    assert_one_line_error(r, "t_train_000002.bin", "magic")
    assert not (tmp_path / "o").exists()


def test_seq_len_longer_than_block_size(data_dir, tmp_path):
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", str(tmp_path / "o"),
                        "--seq_len", "64", "--block_size", "32", "--total_batch_size", "512"])
    assert_one_line_error(r, "--seq_len 64", "block_size 32")


def test_indivisible_batch(data_dir, tmp_path):
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", str(tmp_path / "o"),
                        "--total_batch_size", "300"])
    assert_one_line_error(r, "--total_batch_size 300", "128")


def test_fresh_run_refuses_to_overwrite_checkpoints(data_dir, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", out]).returncode == 0
    before = open(os.path.join(out, "ckpt_0000001.pt"), "rb").read()
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", out, "--lr", "1e-2"])
    assert_one_line_error(r, "--resume auto")
    assert open(os.path.join(out, "ckpt_0000001.pt"), "rb").read() == before
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", out, "--resume", "auto",
                        "--n_embd", "256", "--n_head", "4"])
    assert_one_line_error(r, "different model", "n_embd")


def test_compiled_run_trains_evaluates_and_samples_like_eager(data_dir, tmp_path):
    common = TINY + ["--data_dir", data_dir, "--max_steps", "2", "--val_every", "2", "--sample_every", "2"]
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    r1 = run_cli(common + ["--out_dir", eager, "--no-compile"])
    r2 = run_cli(common + ["--out_dir", compiled, "--compile"])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "compile True" in r2.stdout and "sample:" in r2.stdout
    for a, b in zip(read_log(eager), read_log(compiled)):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:  # inductor fuses differently: equal up to fp32 rounding
                assert a[key] == pytest.approx(b[key], rel=1e-4)
    assert "val_loss" in read_log(compiled)[-1]


def test_hellaswag_in_the_loop_matches_the_checkpoint(data_dir, tmp_path):
    import hellaswag_eval

    sample = os.path.join(ROOT, "tests", "data", "hellaswag_sample.jsonl")
    out = str(tmp_path / "o")
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "2", "--out_dir", out, "--hellaswag_every", "2",
                        "--hellaswag_file", sample, "--hellaswag_limit", "10"])
    assert r.returncode == 0, r.stderr
    logged = [rec["hellaswag_acc_norm"] for rec in read_log(out) if "hellaswag_acc_norm" in rec]
    assert len(logged) == 2  # before training and after the last step
    model = tg.load_checkpoint_model(os.path.join(out, "ckpt_0000002.pt"))
    expected = hellaswag_eval.evaluate(model, hellaswag_eval.load_examples(sample, 10), "cpu",
                                       autocast_dtype=torch.float32)
    assert logged[-1] == expected["acc_norm"]


def test_hellaswag_default_file_is_the_one_hellaswag_eval_downloads(data_dir, tmp_path):
    """Without --hellaswag_file the trainer reads the cached copy; absent, it says in one line how to fetch it.
    The fetch is hellaswag_eval.py --download (from a local server here), into the same cache."""
    from test_hellaswag import _Server

    sample = os.path.join(ROOT, "tests", "data", "hellaswag_sample.jsonl")
    body = open(sample, "rb").read()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = TINY + ["--data_dir", data_dir, "--max_steps", "1", "--hellaswag_every", "1", "--hellaswag_limit", "5"]
    r = run_cli(args + ["--out_dir", str(tmp_path / "a")], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "hellaswag_eval.py --download" in r.stderr
    assert not os.path.exists(tmp_path / "a" / "log.jsonl")

    server = _Server(body)
    try:
        code = "import sys, hellaswag_eval as H; H.HELLASWAG_URL = sys.argv[1]; sys.exit(H.main(['--download']))"
        fetched = subprocess.run([sys.executable, "-c", code, server.url], capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, **env}, timeout=120)
    finally:
        server.close()
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "cache" / "gpt2-trainer" / "hellaswag_val.jsonl").read_bytes() == body

    r = run_cli(args + ["--out_dir", str(tmp_path / "b")], env)
    assert r.returncode == 0, r.stderr
    with_file = run_cli(args + ["--out_dir", str(tmp_path / "c"), "--hellaswag_file", sample], env)
    assert with_file.returncode == 0, with_file.stderr
    hellaswag = lambda out: [rec["hellaswag_acc_norm"] for rec in read_log(out) if "hellaswag_acc_norm" in rec]  # noqa: E731
    assert len(hellaswag(tmp_path / "b")) == 2 and hellaswag(tmp_path / "b") == hellaswag(tmp_path / "c")


def test_imports_run_one_way():
    """train_gpt2.py imports none of the repository's other modules; the helper scripts import it; prepare_fineweb
    does not (it starts without torch)."""
    import ast

    def imported(name):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    ours = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))
            + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))} - {"train_gpt2"}
    assert {"sample", "export_hf", "hellaswag_eval", "prepare_fineweb", "gpt2_tokens", "bench_step"} <= ours
    assert not imported("train_gpt2.py") & ours
    for helper in ("hellaswag_eval.py", "sample.py", "export_hf.py", os.path.join("benchmarks", "bench_step.py")):
        assert "train_gpt2" in imported(helper), helper
    assert "train_gpt2" not in imported("prepare_fineweb.py")


@pytest.mark.parametrize("args", [["--help"], TINY + ["--model", "d99", "--data_dir", "missing"],
                                  TINY + ["--data_dir", "missing"]], ids=["help", "bad-preset", "missing-data"])
def test_forked_cli_run_is_what_a_fresh_interpreter_gives(args):
    """run_cli's forked runs stand for `python train_gpt2.py`: the same exit status, stdout and stderr."""
    forked = run_cli(args)
    fresh = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.stdout or fresh.stderr


def test_fsdp_modules_are_imported_only_by_fsdp():
    """torch.distributed.tensor and .fsdp add 1.5 s to every start on a 2-core CPU; only --fsdp imports them (the
    FSDP tests show that the shards are still recognised)."""
    code = ("import sys, train_gpt2; print(sorted(m for m in sys.modules "
            "if m.startswith(('torch.distributed.tensor', 'torch.distributed.fsdp'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
