"""Evaluation inside the trainer: the validation loss is the same number whatever the batch size or world size, and
HellaSwag in the loop (--hellaswag_every) gives what hellaswag_eval.py gives on the checkpoint, from the file
hellaswag_eval.py --download caches. hellaswag_eval.py itself is tested in test_hellaswag.py."""

import os
import subprocess
import sys

import pytest
import torch

import hellaswag_eval
import train_gpt2 as tg
from conftest import HELLASWAG_SAMPLE, ROOT, TINY, FileServer, make_shards, read_log, run_cli

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
# HellaSwag in the loop


def test_hellaswag_in_the_loop_matches_the_checkpoint(data_dir, tmp_path):
    sample = HELLASWAG_SAMPLE
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
    sample = HELLASWAG_SAMPLE
    body = open(sample, "rb").read()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = TINY + ["--data_dir", data_dir, "--max_steps", "1", "--hellaswag_every", "1", "--hellaswag_limit", "5"]
    r = run_cli(args + ["--out_dir", str(tmp_path / "a")], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "hellaswag_eval.py --download" in r.stderr
    assert not os.path.exists(tmp_path / "a" / "log.jsonl")

    server = FileServer(body)
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
