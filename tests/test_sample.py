"""sample.py: the int8 copy of a model (row-wise int8 weights, close to the float model, the original left alone), and
the command line's --int8 report (speeds, validation losses and their difference, checked against the checkpoint and
its int8 copy computed here); bad input in one line."""

import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sample
import train_gpt2 as tg
from conftest import (
    MODEL_VARIANTS,
    TINY_B,
    TINY_T,
    V,
    assert_one_line_error,
    cli,
    mean_loss,
    ok,
    small_model,
    tokens,
    val_sequences,
)

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after

B, T = TINY_B, TINY_T

# ----------------------------------------------------------------------------------------------------------------
# int8 copy for sampling


def test_int8_linear_is_close_to_the_float_linear_row_by_row():
    g = torch.Generator().manual_seed(26)
    linear = nn.Linear(64, 96)
    with torch.no_grad():
        # rows of very different sizes: one scale for the whole matrix would flush the small rows to zero
        row_size = torch.logspace(-3, 1, 96)[:, None]
        linear.weight.copy_(torch.randn(96, 64, generator=g) * row_size)
        linear.bias.copy_(torch.randn(96, generator=g) * 0.01)
    q = sample.Int8Linear(linear.weight, linear.bias)
    w8, scale = q.weight_int8, q.scale
    assert w8.dtype == torch.int8 and w8.shape == (96, 64) and scale.shape == (96,)
    w = linear.weight.detach()
    deq = w8.float() * scale[:, None]
    assert torch.all((deq - w).abs() <= scale[:, None] / 2 * (1 + 1e-5))
    assert torch.all(w8.abs().amax(dim=1) == 127)  # each row's largest weight uses the full range
    assert torch.allclose(scale, w.abs().amax(dim=1) / 127, rtol=1e-6)
    x = torch.randn(5, 7, 64, generator=g)
    with torch.no_grad():
        ref = linear(x)
        got = q(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # close to the float layer overall, and for every output feature, the small rows included (a single scale for
    # the whole matrix would leave those at 100% error); the inputs may be quantized too, so allow a few percent
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
    err = (got - ref).flatten(0, 1).norm(dim=0) / ref.flatten(0, 1).norm(dim=0)
    assert err.max().item() < 0.05
    assert err.max().item() > 0  # it is quantized


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_int8_model_is_close_and_leaves_the_original_alone(variant):
    model = small_model(seed=27, std=0.05, **MODEL_VARIANTS[variant])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx, y = tokens((4, 48), seed=28), tokens((4, 48), seed=29)
    with torch.no_grad():
        logits, loss = model(idx, y)
        q = sample.int8_copy(model)
        q_logits, q_loss = q(idx, y)
    assert q is not model
    n_layer = model.config.n_layer
    assert not [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, sample.Int8Linear) for m in q.modules()) == 4 * n_layer + 1
    assert isinstance(q.lm_head, sample.Int8Linear)
    assert torch.all(q_logits[..., V:] == float("-inf")) and torch.isfinite(q_logits[..., :V]).all()
    assert abs(q_loss.item() - loss.item()) < 0.02
    assert q_loss.item() != loss.item()
    rel = (q_logits[..., :V] - logits[..., :V]).norm() / logits[..., :V].norm()
    assert rel.item() < 0.1
    # the original: same modules, same tensors, same tying, same output
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 4 * n_layer + 1
    assert not any(isinstance(m, sample.Int8Linear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_embeddings
    with torch.no_grad():
        assert torch.equal(model(idx)[0], logits)


# ---------------------------------------------------------------------------------------------------------------
# the command line: --int8, and its bad input


def batched_loss(model, seqs, batch):
    """Mean next-token loss over `seqs` fed `batch` at a time, in order (int8 quantises each call's input as a whole,
    so the grouping matters); the reduction is done here."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i: i + batch]
            logits = model(chunk[:, :-1])[0][..., :tg.GPT2_VOCAB_SIZE].double()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
    return total / (seqs.shape[0] * (seqs.shape[1] - 1))


def test_sample_int8_reports_consistent_numbers(shards, base_run, tmp_path):
    folder = shards[0]
    # the base checkpoint with large weights, each row holding one outlier: int8 rounding then moves the loss
    # clearly, so a wrong sign or a mixed-up variant cannot pass for rounding
    saved = torch.load(os.path.join(base_run, "ckpt_0000001.pt"), map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for name, w in saved["model"].items():
        if w.dim() == 2:
            w.normal_(0, 0.15, generator=gen)
            w[:, 0] = 10.0
    path = str(tmp_path / "ckpt_0000001.pt")
    torch.save(saved, path)
    r = ok(cli(["--resume", path, "--int8", "--device", "cpu", "--dtype", "fp32",
                "--data_dir", folder, "--seq_len", T, "--batch_size", B, "--val_tokens", 1024,
                "--sample_tokens", 8, "--prompt", "Hello"], main=sample.main))
    speed = {m.group(1): float(m.group(2)) for m in re.finditer(
        rf"^(full|int8) \({re.escape(path)}\): ([\d.]+) tok/s \| ['\"]Hello.*$", r.stdout, re.M)}
    assert speed.keys() == {"full", "int8"}, r.stdout
    loss = {m.group(1): (float(m.group(2)), int(m.group(3).replace(",", ""))) for m in re.finditer(
        r"^(full|int8): val loss ([\d.]+) over ([\d,]+) tokens$", r.stdout, re.M)}
    assert loss.keys() == {"full", "int8"}, r.stdout
    assert loss["full"][1] == loss["int8"][1] == 1024
    m = re.search(r"^int8 vs full: ([\d.]+)x tokens/s, val loss ([+-][\d.]+)$", r.stdout, re.M)
    assert m, r.stdout
    # the summary agrees with the two lines above it, up to their printed rounding
    assert abs(float(m.group(2)) - (loss["int8"][0] - loss["full"][0])) <= 1.5e-4
    assert abs(loss["int8"][0] - loss["full"][0]) > 1e-3
    ratio = speed["int8"] / speed["full"]
    assert abs(float(m.group(1)) - ratio) <= 0.006 + 1e-3 * ratio

    # and both losses are those of the checkpoint and of its int8 copy on the validation sequences, summed here
    model = tg.load_checkpoint_model(path)
    seqs = val_sequences(folder, T, 1024)
    assert len(seqs) % B == 0  # no padded rows: the batches below are the command's
    assert abs(loss["full"][0] - mean_loss(lambda x: model(x)[0], seqs)) <= 1e-4
    assert abs(loss["int8"][0] - batched_loss(sample.int8_copy(model), seqs, B)) <= 1e-4


@pytest.mark.parametrize("flags, fragments", [
    ([], ["--resume", "--init_from"]),
    (["--resume", "auto"], ["no checkpoint in", "--resume PATH"]),
    (["--resume", "/nonexistent/ckpt.pt"], ["does not exist"]),
])
def test_sample_without_what_it_needs(tmp_path, flags, fragments):
    out = tmp_path / "o"
    r = cli(["--out_dir", str(out)] + flags, main=sample.main)
    assert_one_line_error(r, *fragments)
    assert not out.exists()
