"""
The optimizers and learning-rate schedules of train_gpt2.py: the cosine schedule against its formula, AdamW's decay
groups, fusing and decoupled decay, Muon's orthogonalisation and NorMuon's step against their formulas, which
optimizer and which learning-rate flag each parameter gets (AdamW, SGD, Muon, the speedrun's Adam groups), the WSD
schedule and Muon's momentum warmup, and two SGD steps on the command line against a hand-computed update.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_gpt2 as tg
from conftest import (
    GPT2_V,
    TINY,
    TINY_B,
    TINY_T,
    block_matrix_names,
    cli,
    load_weights,
    ok,
    randomize_,
    schedule,
    small_gpt2,
    tiny_model,
    tokens,
)
from train_gpt2 import adamw, lr_at

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after

B, T = TINY_B, TINY_T


def configure_optimizer(model, lr, weight_decay, device_type):
    """AdamW over the whole model, as the trainer builds it for --optimizer adamw."""
    return adamw(list(model.parameters()), lr, weight_decay, device_type)


# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedule


def reference_lr(step, max_lr, warmup, max_steps, ratio):
    """The schedule as described: linear warmup to max_lr over `warmup` steps, starting at max_lr/warmup, then a
    half cosine from max_lr down to ratio*max_lr at max_steps, constant after."""
    lo = ratio * max_lr
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= max_steps:
        return lo
    return lo + (max_lr - lo) * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) / 2


SCHEDULES = [(6e-4, 10, 100, 0.1), (1e-3, 715, 19073, 0.1), (3e-4, 0, 50, 0.0), (1.0, 1, 2, 0.5), (2e-3, 5, 6, 0.1)]


@pytest.mark.parametrize("max_lr,warmup,max_steps,ratio", SCHEDULES)
def test_lr_schedule_shape(max_lr, warmup, max_steps, ratio):
    lrs = [lr_at(s, max_lr, warmup, max_steps, ratio) for s in range(max_steps + 20)]
    assert lrs[0] > 0
    # strictly increasing through warmup, peaking at max_lr at its last step
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[max(warmup - 1, 0)] == pytest.approx(max_lr, rel=1e-12)
    assert max(lrs) == pytest.approx(max_lr, rel=1e-12)
    # never rises after warmup, and is flat at the floor from max_steps on
    assert all(b <= a + 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert all(lr == pytest.approx(ratio * max_lr, rel=1e-12, abs=1e-15) for lr in lrs[max_steps:])
    assert min(lrs[warmup:]) >= ratio * max_lr - 1e-15


@pytest.mark.parametrize("max_lr,warmup,max_steps,ratio", SCHEDULES)
def test_lr_schedule_matches_reference_formula(max_lr, warmup, max_steps, ratio):
    points = {0, max(warmup - 1, 0), warmup, (warmup + max_steps) // 2, max_steps - 1, max_steps, max_steps + 7}
    points |= set(range(0, max_steps + 10, max(1, max_steps // 13)))
    for s in sorted(points):
        assert lr_at(s, max_lr, warmup, max_steps, ratio) == pytest.approx(
            reference_lr(s, max_lr, warmup, max_steps, ratio), rel=1e-12, abs=1e-18), s


def test_lr_cosine_midpoint_is_halfway():
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55, rel=1e-12)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0, rel=1e-12)


def test_lr_is_the_floor_from_max_steps_even_when_warmup_is_longer():
    max_lr, warmup, max_steps, ratio = 6e-4, 715, 100, 0.1
    for s in (max_steps, max_steps + 1, 500, warmup, 2 * warmup):
        assert lr_at(s, max_lr, warmup, max_steps, ratio) == pytest.approx(ratio * max_lr), s


# ----------------------------------------------------------------------------------------------------------------
# AdamW


def fused_adamw_supported() -> bool:
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(4))], lr=1e-3, fused=True)
        return True
    except (RuntimeError, TypeError):
        return False


def test_decay_groups():
    model = tiny_model()
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, device_type="cpu")
    groups = opt.param_groups
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups})  # every tensor once, the tied one included
    assert sum(1 for p in in_groups if p is model.lm_head.weight) == 1
    assert {id(p) for p in in_groups} == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in in_groups) == model.num_params(exclude_padding=False)
    for g in groups:
        if g["params"] and g["params"][0].dim() >= 2:
            assert g["weight_decay"] == 0.1
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert decayed == {id(p) for n, p in named.items() if n.endswith("weight") and "ln_" not in n}
    assert all(g["lr"] == 1e-3 for g in groups)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_optimizer_is_fused_where_supported():
    opt = configure_optimizer(tiny_model(), lr=1e-3, weight_decay=0.1, device_type="cpu")
    expected = fused_adamw_supported()
    assert bool(opt.defaults.get("fused")) == expected
    assert all(bool(g.get("fused")) == expected for g in opt.param_groups)
    if not expected:
        assert opt.defaults.get("foreach")


def test_weight_decay_applies_once_to_matrices_and_never_to_vectors():
    """With zero gradients AdamW's update is zero and only the decoupled decay moves the weights: matrices shrink
    by exactly (1 - lr*wd), the tied one once (not squared), vectors stay put."""
    model = randomize_(tiny_model(), seed=17)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.01, 0.5
    opt = configure_optimizer(model, lr=lr, weight_decay=wd, device_type="cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - lr * wd) if p.dim() >= 2 else before[n]
        assert torch.allclose(p, expected, rtol=1e-6, atol=0), n


# ---------------------------------------------------------------------------------------------------------------
# Muon and NorMuon


def test_orthogonalize_gives_the_polar_factor():
    g = torch.randn(96, 48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    for coefficients, spread in ((tg.POLAR_EXPRESS, 0.15), (tg.NEWTON_SCHULZ, 0.35)):
        x = tg.orthogonalize(g, coefficients, torch.float64)
        s = u.T @ x @ vt.T  # diagonal exactly when x shares g's singular vectors
        assert (s - torch.diag(torch.diag(s))).abs().max() < 1e-6
        assert (torch.diag(s) - 1).abs().max() < spread
        torch.testing.assert_close(tg.orthogonalize(g.T, coefficients, torch.float64), x.T)


def reference_normuon(w, grads, lr, momentum, beta2, decay):
    """NorMuon as its paper states it, in float64, with the trainer's orthogonalisation."""
    w, buf, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64), None
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        o = tg.orthogonalize((1 - momentum) * g + momentum * buf, tg.POLAR_EXPRESS, torch.float64)
        mean_sq = (o ** 2).mean(dim=1 if o.shape[0] >= o.shape[1] else 0, keepdim=True)
        v = (1 - beta2) * mean_sq if v is None else beta2 * v + (1 - beta2) * mean_sq
        n = o / v.sqrt()
        n = n * o.norm() / n.norm()
        w = w - lr * decay * w * ((n * w) >= 0) - lr * max(1, w.shape[0] / w.shape[1]) ** 0.5 * n
    return w


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_normuon_steps_match_the_formulas(shape):
    gen = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    ref = reference_normuon(w.detach(), grads, lr=0.02, momentum=0.9, beta2=0.95, decay=0.5)
    opt = tg.Muon([w], lr=0.02, momentum=0.9, weight_decay=0.5, normuon=True, beta2=0.95, ortho_dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), ref, rtol=1e-10, atol=1e-10)


def test_muon_runs_its_iterations_in_the_dtype_it_is_given(monkeypatch):
    seen = []
    real = tg.orthogonalize
    monkeypatch.setattr(tg, "orthogonalize", lambda g, c, dtype: seen.append(dtype) or real(g, c, dtype))
    model = small_gpt2(norm="rmsnorm", bias=False)
    settings = tg.parse_settings(["--optimizer", "muon"])
    for dtype in (torch.float32, torch.bfloat16):
        muon, _ = tg.configure_optimizers(model, settings, "cpu", ortho_dtype=dtype)
        model(tokens((1, 8), high=GPT2_V), tokens((1, 8), seed=1, high=GPT2_V))[1].backward()
        muon.step()
        assert set(seen) == {dtype}
        seen.clear()


def test_adam_groups_take_their_own_learning_rates():
    model = small_gpt2(tie_embeddings=False, x0_lambdas=True)
    args = tg.parse_settings(["--optimizer", "normuon", "--embed_lr", "0.3", "--head_lr", "0.01", "--scalar_lr", "0.05",
                              "--lr", "0.001"])
    muon, adam = tg.configure_optimizers(model, args, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    by_flag = {}
    for g in adam.param_groups:
        by_flag.setdefault(g["lr_flag"], set()).update(names[id(p)] for p in g["params"])
        assert g["lr"] == getattr(args, g["lr_flag"])
    assert by_flag["embed_lr"] == {"transformer.wte.weight"} and by_flag["head_lr"] == {"lm_head.weight"}
    assert {"resid_lambdas", "x0_lambdas", "transformer.h.0.ln_1.weight"} <= by_flag["scalar_lr"]
    assert "transformer.wpe.weight" in by_flag["lr"]
    assert all(p.dim() == 2 and names[id(p)].startswith("transformer.h.") for p in muon.param_groups[0]["params"])


# ---------------------------------------------------------------------------------------------------------------
# the WSD schedule and Muon's momentum warmup


def test_wsd_schedule_is_flat_then_a_straight_line_to_the_floor():
    max_steps, warmup, cooldown_frac, ratio = 50, 5, 0.4, 0.1
    for step in range(max_steps + 5):
        got = tg.lr_at(step, 2.0, warmup, max_steps, ratio, "wsd", cooldown_frac)
        if step < warmup:
            want = 2.0 * (step + 1) / warmup
        elif step >= max_steps:
            want = 0.2
        else:
            want = 0.2 + 1.8 * min(1.0, (max_steps - step) / 20)
        assert got == pytest.approx(want, rel=1e-12), step
    assert tg.lr_at(29, 1.0, 5, 50, 0.0, "wsd", 0.4) == 1.0 and tg.lr_at(31, 1.0, 5, 50, 0.0, "wsd", 0.4) < 1.0


def test_muon_momentum_warms_up_linearly():
    assert [tg.muon_momentum_at(s, 0.95, 4) for s in range(6)] == pytest.approx([0.85, 0.875, 0.9, 0.925, 0.95, 0.95])
    assert tg.muon_momentum_at(0, 0.95, 0) == 0.95


# ---------------------------------------------------------------------------------------------------------------
# which optimizer trains which parameter, and SGD's update on the command line


def build(name, **overrides):
    args = tg.parse_settings(["--optimizer", name, "--lr", "0.004", "--weight_decay", "0.05", "--muon_lr", "0.03",
                          "--muon_momentum", "0.9", "--muon_weight_decay", "0.01", "--sgd_momentum", "0.7"])
    config = tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, **overrides)
    torch.manual_seed(0)
    model = tg.GPT(config)
    return model, tg.configure_optimizers(model, args, "cpu"), args


@pytest.mark.parametrize("overrides", [
    {},
    dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=1),
    dict(tie_embeddings=False, bias=False),
])
def test_muon_takes_the_block_matrices_and_adamw_everything_else(overrides):
    model, opts, args = build("muon", **overrides)
    assert [type(o) for o in opts] == [tg.Muon, torch.optim.AdamW]
    muon, adam = opts
    names = {id(p): n for n, p in model.named_parameters()}  # the tied matrix appears once, as wte
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    adam_params = [p for g in adam.param_groups for p in g["params"]]
    assert sorted(names[id(p)] for p in muon_params) == sorted(block_matrix_names(2))
    everything = muon_params + adam_params
    assert len({id(p) for p in everything}) == len(everything)  # none twice
    assert {id(p) for p in everything} == {id(p) for p in model.parameters()}  # none missing
    adam_names = {names[id(p)] for p in adam_params}
    assert "transformer.wte.weight" in adam_names and "transformer.ln_f.weight" in adam_names
    assert ("lm_head.weight" in adam_names) == (not model.config.tie_embeddings)
    assert ("transformer.wpe.weight" in adam_names) == (model.config.pos == "learned")
    if model.config.bias:
        assert "transformer.h.0.attn.c_attn.bias" in adam_names
    # AdamW decays exactly its >= 2-D tensors (embeddings, untied head), never gains or biases
    decayed = {names[id(p)] for g in adam.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {n for n in adam_names if dict(model.named_parameters())[n].dim() >= 2}
    assert all(g["weight_decay"] in (0.0, args.weight_decay) for g in adam.param_groups)
    assert all(g["lr"] == args.lr and g["lr_flag"] == "lr" for g in adam.param_groups)
    for g in muon.param_groups:
        assert g["lr_flag"] == "muon_lr" and g["lr"] == args.muon_lr
        assert g["momentum"] == args.muon_momentum and g["weight_decay"] == args.muon_weight_decay and g["nesterov"]


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_adamw_and_sgd_cover_every_parameter_once(name, kind):
    model, opts, args = build(name, tie_embeddings=True)
    assert [type(o) for o in opts] == [kind]
    params = [p for g in opts[0].param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    for g in opts[0].param_groups:
        assert g["lr_flag"] == "lr" and g["lr"] == args.lr
        assert g["weight_decay"] == (args.weight_decay if all(p.dim() >= 2 for p in g["params"]) else 0.0)
        assert all(p.dim() < 2 for p in g["params"]) or all(p.dim() >= 2 for p in g["params"])
        if kind is torch.optim.SGD:
            assert g["momentum"] == args.sgd_momentum and g["nesterov"]


def test_two_sgd_steps_on_the_cli_match_a_hand_computed_update(shards, tmp_path):
    """Nesterov momentum and L2 decay on matrices, written out with plain tensor arithmetic, on batches read here
    from the train tokens: init, data order, gradient accumulation and schedule all have to agree."""
    folder, train = shards
    lr, momentum, wd = 0.5, 0.9, 0.1
    out = str(tmp_path / "o")
    ok(cli(TINY + ["--data_dir", folder, "--out_dir", out, "--max_steps", 2, "--val_every", 0, "--optimizer", "sgd",
                   "--lr", lr, "--sgd_momentum", momentum, "--weight_decay", wd, "--grad_clip", 0]))
    got = load_weights(os.path.join(out, "ckpt_0000002.pt"))

    torch.manual_seed(1337)  # the default --seed, set right before the model is built
    model = tg.GPT(tg.GPTConfig(n_layer=2, n_head=2, n_embd=128))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {}
    for step in range(2):
        model.zero_grad(set_to_none=True)
        for micro in range(2):
            pos = (2 * step + micro) * B * T
            chunk = torch.from_numpy(train[pos: pos + B * T + 1].astype(np.int64))
            _, loss = model(chunk[:-1].view(B, T), chunk[1:].view(B, T))
            (loss / 2).backward()
        step_lr = lr * schedule(step, 1, 2)
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = p.grad + wd * p if p.dim() >= 2 else p.grad.clone()
                buffers[n] = g.clone() if step == 0 else momentum * buffers[n] + g
                p -= step_lr * (g + momentum * buffers[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    moved = max((got[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3  # far above the tolerance: a wrong momentum or decay could not hide in it
