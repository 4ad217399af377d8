"""
The model options beyond GPT-2 as released, and the ways a trained model leaves this project: rotary position
embeddings, grouped-query attention, the KV cache, activation checkpointing, SwiGLU, bias-free and untied models,
dropout, the int8 inference copy, export to a Hugging Face directory (GPT-2 or Llama layout, with the GPT-2
tokenizer) and the export + HellaSwag command lines.

Every check compares against a computation written out here (complex rotations, an explicit softmax attention, the
uncached forward, Hugging Face's own implementation, tiktoken) rather than against recorded numbers. Models are
tiny and fp32.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import math
import os
import re
import subprocess
import symtable
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import export_hf as ex  # noqa: E402
import sample  # noqa: E402
import train_gpt2 as tg  # noqa: E402

V, VP = 300, 320  # small vocabulary and its padded size for the model-only tests
GPT2_V = 50257
EXPORT_SCRIPT = os.path.join(REPO, "export_hf.py")
HELLASWAG_SCRIPT = os.path.join(REPO, "hellaswag_eval.py")
SAMPLE = os.path.join(REPO, "tests", "data", "hellaswag_sample.jsonl")
CORPUS = os.path.join(REPO, "data", "gutenberg_sample.parquet")

LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
VARIANTS = {
    "classic": {},
    "rope": dict(pos="rope"),
    "modern": dict(LLAMA_STYLE, n_kv_head=1),  # rope + multi-query + swiglu + rmsnorm + no bias
    "untied": dict(tie_embeddings=False),
}
NORM_GAINS = ("ln_1.weight", "ln_2.weight", "ln_f.weight")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than several, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> tg.GPTConfig:
    values = dict(block_size=64, vocab_size=V, padded_vocab_size=VP, n_layer=2, n_head=4, n_embd=64)
    values.update(overrides)
    return tg.GPTConfig(**values)


def randomize_(model: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Non-trivial values for every parameter (norm gains around 1, everything else around 0), so that a weight
    read from the wrong rows or ignored changes the output and attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if name.endswith(NORM_GAINS) else noise)
    return model


def small_model(seed: int = 0, std: float = 0.1, **overrides) -> tg.GPT:
    torch.manual_seed(seed)
    return randomize_(tg.GPT(small_config(**overrides)), seed=seed + 100, std=std).eval()


def tokens(shape, seed: int = 0, high: int = V) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def quiet_transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ----------------------------------------------------------------------------------------------------------------
# rotary position embeddings


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x (..., T, hd) in float64 as complex numbers: pair i is (x_i, x_{i+hd/2}) and turns by
    t * theta^(-2i/hd) at position t."""
    hd = x.size(-1)
    half = hd // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    angle = positions.double()[:, None] * freq[None, :]  # (T, hd/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
@pytest.mark.parametrize("start", [0, 7])
def test_apply_rotary_is_a_complex_rotation_of_half_pairs(theta, start):
    hd, T = 16, 24
    x = torch.randn(2, 3, T, hd, generator=torch.Generator().manual_seed(1))
    rotary = tg.Rotary(hd, 64, theta)
    cos, sin = rotary(start, T)
    assert cos.shape == sin.shape == (T, hd // 2)
    got = tg.apply_rotary(x, cos, sin)
    ref = rope_reference(x, torch.arange(start, start + T), theta)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert (got.double() - ref).abs().max().item() <= 1e-5
    # a rotation: the length of every pair is kept, and position 0 is the identity
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    if start == 0:
        assert torch.allclose(got[:, :, 0], x[:, :, 0], atol=0, rtol=0)
    else:  # and the test can fail: adjacent-pair rotation (x_2i, x_2i+1) is a different function
        adjacent = x.view(2, 3, T, hd // 2, 2)
        z = torch.complex(adjacent[..., 0].double(), adjacent[..., 1].double())
        freq = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        z = z * torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(start, start + T)[:, None] * freq)
        wrong = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
        assert (got.double() - wrong).abs().max().item() > 1e-2


def test_rope_scores_depend_only_on_relative_position():
    hd, T, theta = 32, 64, 10000.0
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    cos, sin = tg.Rotary(hd, T, theta)(0, T)
    # the same query and key vector at every position: scores[m, n] = <rot(q, m), rot(k, n)>
    rq = tg.apply_rotary(q.expand(1, 1, T, hd), cos, sin)[0, 0]
    rk = tg.apply_rotary(k.expand(1, 1, T, hd), cos, sin)[0, 0]
    scores = (rq @ rk.T).double()
    # closed form: sum_i Re(q_i conj(k_i) e^{i (m - n) w_i}) over the complex pairs
    half = hd // 2
    zq = torch.complex(q[:half].double(), q[half:].double())
    zk = torch.complex(k[:half].double(), k[half:].double())
    w = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    offsets = torch.arange(T, dtype=torch.float64)[:, None] - torch.arange(T, dtype=torch.float64)[None, :]
    closed = (zq * zk.conj() * torch.exp(1j * offsets[..., None] * w)).real.sum(-1)
    assert (scores - closed).abs().max().item() <= 1e-4
    for s in (1, 5, 30):  # shifting both positions by s changes nothing
        assert (scores[s:, s:] - scores[:-s, :-s]).abs().max().item() <= 1e-4
    # but the offset does matter
    assert scores.diagonal(0).std().item() < 1e-4
    assert (scores.diagonal(-3) - scores.diagonal(0)[3:]).abs().max().item() > 1e-2


def test_rope_model_has_no_position_table():
    learned, rope = small_model(), small_model(pos="rope")
    assert learned.rotary is None and "wpe" in learned.transformer
    assert isinstance(rope.rotary, tg.Rotary) and "wpe" not in rope.transformer
    assert not any("wpe" in name for name in rope.state_dict())
    assert rope.rotary.cos.shape == (64, 16 // 2)
    assert rope.num_params(exclude_padding=False) == learned.num_params(exclude_padding=False) - 64 * 64


# ----------------------------------------------------------------------------------------------------------------
# grouped-query attention


def attention_reference(attn, x: torch.Tensor, n_head: int, n_kv_head: int, theta: float | None,
                        interleaved: bool = True) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V written out, from the module's own weights: c_attn's rows are the
    queries of every head, then the keys, then the values of the key/value heads; query head h reads key/value head
    h // (n_head / n_kv_head) (or, with interleaved=False, h % n_kv_head: the wrong grouping)."""
    B, T, C = x.shape
    hd = C // n_head
    W = attn.c_attn.weight.double()
    qkv = x.double() @ W.T
    if attn.c_attn.bias is not None:
        qkv = qkv + attn.c_attn.bias.double()
    q = qkv[..., : n_head * hd].view(B, T, n_head, hd).transpose(1, 2)
    k = qkv[..., n_head * hd: (n_head + n_kv_head) * hd].view(B, T, n_kv_head, hd).transpose(1, 2)
    v = qkv[..., (n_head + n_kv_head) * hd:].view(B, T, n_kv_head, hd).transpose(1, 2)
    assert v.size(1) == n_kv_head and qkv.size(-1) == (n_head + 2 * n_kv_head) * hd
    if theta is not None:
        q, k = rope_reference(q, torch.arange(T), theta), rope_reference(k, torch.arange(T), theta)
    group = n_head // n_kv_head
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(n_head):
        g = h // group if interleaved else h % n_kv_head
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, g])
    y = torch.stack(heads, dim=1).transpose(1, 2).reshape(B, T, C)
    out = y @ attn.c_proj.weight.double().T
    if attn.c_proj.bias is not None:
        out = out + attn.c_proj.bias.double()
    return out


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_attention_matches_explicit_reference(n_kv_head, pos):
    model = small_model(seed=3, std=0.2, n_kv_head=n_kv_head, pos=pos, rope_theta=1000.0)
    attn = model.transformer.h[1].attn
    hd = 16
    assert attn.c_attn.weight.shape == ((4 + 2 * n_kv_head) * hd, 64)
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(4))
    rope = model.rotary(0, 20) if pos == "rope" else None
    with torch.no_grad():
        got = attn(x, rope)
    ref = attention_reference(attn, x, 4, n_kv_head, 1000.0 if pos == "rope" else None)
    assert (got.double() - ref).abs().max().item() <= 1e-5
    assert ref.std().item() > 0.1
    if n_kv_head == 2:  # the test can fail: query heads grouped the other way round (h % n_kv_head) differ
        wrong = attention_reference(attn, x, 4, n_kv_head, 1000.0 if pos == "rope" else None, interleaved=False)
        assert (got.double() - wrong).abs().max().item() > 1e-3


def test_kv_cache_stores_only_the_key_value_heads():
    model = small_model(seed=5, n_kv_head=2, pos="rope")
    cache = tg.KVCache(model.config, 3)
    with torch.no_grad():
        model(tokens((3, 9), seed=6), cache=cache)
    assert cache.pos == 9
    assert all(k.shape == (3, 2, 64, 16) and v.shape == (3, 2, 64, 16) for k, v in zip(cache.k, cache.v))


@pytest.mark.parametrize("preset,overrides,message", [
    ("d4", dict(n_kv_head=3), "n_kv_head 3"),
    ("d4", dict(n_kv_head=8), "n_kv_head 8"),
    ("d4", dict(n_kv_head=0), "n_kv_head 0"),
    ("d2", dict(n_embd=60, n_head=4, pos="rope"), "head size 15"),
    ("d2", dict(dropout=1.0), "dropout"),
    ("d2", dict(dropout=-0.1), "dropout"),
])
def test_invalid_option_mixes_are_user_errors(preset, overrides, message):
    with pytest.raises(tg.UserError, match=message):
        tg.model_config(preset, **overrides)


def test_valid_kv_head_counts_are_accepted():
    for kv in (1, 2, 4):
        c = tg.model_config("d4", n_kv_head=kv)
        assert c.n_kv_head == kv and c.n_head == 4
    assert tg.model_config("d4").n_kv_head == 4  # default: one key/value head per query head
    assert tg.model_config("d2", n_embd=120, n_head=4, pos="rope").head_dim == 30  # any even head size rotates
    assert tg.model_config("d2", dropout=0.0).dropout == 0.0 and tg.model_config("d2", dropout=0.99).dropout == 0.99


# ----------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_forward_matches_full_forward(variant):
    model = small_model(seed=7, **VARIANTS[variant])
    B, T = 2, 40
    idx = tokens((B, T), seed=8)
    with torch.no_grad():
        full, _ = model(idx)
        # prefill 10, then one token at a time
        cache = tg.KVCache(model.config, B)
        steps = [model(idx[:, :10], cache=cache)[0]]
        for t in range(10, T):
            steps.append(model(idx[:, t: t + 1], cache=cache)[0])
        one_by_one = torch.cat(steps, dim=1)
        # prefill 10, then chunks of 7 and 5 after cached tokens, then single tokens
        cache = tg.KVCache(model.config, B)
        chunks, start = [], 0
        for size in [10, 7, 5] + [1] * (T - 22):
            chunks.append(model(idx[:, start: start + size], cache=cache)[0])
            start += size
        chunked = torch.cat(chunks, dim=1)
    assert cache.pos == T
    for got in (one_by_one, chunked):
        assert got.shape == full.shape
        assert (got[..., :V] - full[..., :V]).abs().max().item() <= 1e-5
        assert torch.all(got[..., V:] == float("-inf"))
    assert full[..., :V].std().item() > 0.3
    # the test can fail: a cache that forgot the prefix gives other logits
    with torch.no_grad():
        fresh = model(idx[:, 10:11])[0]
    assert (fresh[:, 0, :V] - full[:, 10, :V]).abs().max().item() > 1e-2


def test_cache_past_block_size_is_refused():
    model = small_model(seed=9, pos="rope", block_size=16)
    cache = tg.KVCache(model.config, 1)
    with torch.no_grad():
        model(tokens((1, 16), seed=10), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(tokens((1, 1), seed=11), cache=cache)


def greedy_reference(model: tg.GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by full forwards over the last block_size tokens."""
    block = model.config.block_size
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -block:])
            idx = torch.cat([idx, logits[:, -1, :V].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prompt_len", [5, 20])
def test_generate_with_and_without_cache_agree_past_block_size(variant, prompt_len):
    model = small_model(seed=12, std=0.15, block_size=16, **VARIANTS[variant])
    idx = tokens((2, prompt_len), seed=13)
    n = 30  # 5 + 30 and 20 + 30 tokens: well past block_size 16, so the window slides
    runs = {}
    for use_cache in (True, False):
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed)
            runs[use_cache, seed] = model.generate(idx, n, top_k=None, generator=gen, use_cache=use_cache)
    for seed in (1, 2):
        assert runs[True, seed].shape == (2, prompt_len + n)
        assert torch.equal(runs[True, seed], runs[False, seed])
        assert torch.equal(runs[True, seed][:, :prompt_len], idx)
    assert not torch.equal(runs[True, 1], runs[True, 2])  # sampling really depends on the generator
    greedy = model.generate(idx, n, top_k=1, generator=torch.Generator().manual_seed(0), use_cache=True)
    assert torch.equal(greedy, greedy_reference(model, idx, n))


# ----------------------------------------------------------------------------------------------------------------
# activation checkpointing


def loss_and_grads(model: tg.GPT, idx, y, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, loss = model(idx, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["classic", "modern", "untied"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant, dropout, monkeypatch):
    model = small_model(seed=14, std=0.05, dropout=dropout, **VARIANTS[variant]).train()
    idx, y = tokens((2, 32), seed=15), tokens((2, 32), seed=16)
    plain_loss, plain = loss_and_grads(model, idx, y, seed=3)

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.activation_checkpointing = True
    ckpt_loss, ckpt = loss_and_grads(model, idx, y, seed=3)
    assert len(calls) == model.config.n_layer  # one checkpointed segment per block
    assert torch.allclose(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert ckpt.keys() == plain.keys()
    for name in plain:
        assert plain[name].abs().max() > 0, name
        assert torch.allclose(ckpt[name], plain[name], rtol=1e-6, atol=1e-6), name
    # eval mode and no_grad do not checkpoint
    calls.clear()
    with torch.no_grad():
        model(idx)
    model.eval()
    model(idx)
    assert calls == []
    if dropout > 0:  # the comparison means something: another seed draws other masks
        model.train()
        other_loss, _ = loss_and_grads(model, idx, y, seed=4)
        assert abs(other_loss.item() - plain_loss.item()) > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU, biases, tied and untied heads, dropout


@pytest.mark.parametrize("n_embd,hidden", [(384, 1024), (768, 2048), (64, 192), (128, 384), (1024, 2752)])
def test_swiglu_hidden_default_is_eight_thirds_rounded_up_to_64(n_embd, hidden):
    c = tg.GPTConfig(n_embd=n_embd, n_head=n_embd // 64, mlp="swiglu")
    assert c.mlp_hidden == hidden
    assert hidden % 64 == 0 and hidden >= 8 * n_embd / 3 > hidden - 64
    assert tg.GPTConfig(n_embd=n_embd, n_head=n_embd // 64).mlp_hidden == 4 * n_embd
    assert tg.GPTConfig(n_embd=n_embd, n_head=n_embd // 64, mlp="swiglu", mlp_hidden=100).mlp_hidden == 100


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_forward_matches_hand_computation(bias):
    model = small_model(seed=17, std=0.2, mlp="swiglu", bias=bias)
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp, tg.SwiGLU)
    H = model.config.mlp_hidden
    assert H == 192 and mlp.c_fc.weight.shape == (2 * H, 64) and mlp.c_proj.weight.shape == (64, H)
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    W, P = mlp.c_fc.weight.double(), mlp.c_proj.weight.double()
    gate, up = x @ W[:H].T, x @ W[H:].T
    if bias:
        gate, up = gate + mlp.c_fc.bias[:H].double(), up + mlp.c_fc.bias[H:].double()
    hidden = gate / (1 + torch.exp(-gate)) * up  # silu(gate) * up
    ref = hidden @ P.T + (mlp.c_proj.bias.double() if bias else 0)
    with torch.no_grad():
        got = mlp(x.float())
    assert (got.double() - ref).abs().max().item() <= 1e-5
    # the test can fail: the halves the other way round (up gated) is a different function
    swapped = up / (1 + torch.exp(-up)) * gate @ P.T + (mlp.c_proj.bias.double() if bias else 0)
    assert (swapped - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("overrides", [dict(bias=False), dict(LLAMA_STYLE), dict(LLAMA_STYLE, n_kv_head=2)],
                         ids=["classic", "llama", "llama_gqa"])
def test_no_bias_means_no_bias_parameters(overrides):
    model = small_model(**overrides)
    names = [n for n, _ in model.named_parameters()]
    assert names and not [n for n in names if "bias" in n]
    # with biases the same model has them in every Linear (and LayerNorm)
    with_bias = small_model(**{**overrides, "bias": True})
    linears = [n for n, m in with_bias.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert linears and all(with_bias.get_submodule(n).bias is not None for n in linears)


def test_untied_head_has_its_own_matrix_and_both_are_counted():
    tied, untied = small_model(seed=19), small_model(seed=19, tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    unique = {id(p): p for p in untied.parameters()}
    total = sum(p.numel() for p in unique.values())
    assert untied.num_params(exclude_padding=False) == total
    assert untied.num_params() == total - 2 * (VP - V) * 64
    assert untied.num_params() - tied.num_params() == V * 64  # one more real-vocabulary matrix
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(dict(untied.named_parameters()))
    # each matrix gets only its own gradient
    untied.train()
    idx, y = tokens((2, 16), seed=20), tokens((2, 16), seed=21)
    untied(idx, y)[1].backward()
    g_embed, g_head = untied.transformer.wte.weight.grad, untied.lm_head.weight.grad
    unused = torch.ones(VP, dtype=torch.bool)
    unused[idx.unique()] = False
    assert torch.all(g_embed[unused] == 0) and g_head[unused[:V].nonzero()[:, 0]].abs().max() > 0


def test_zero_dropout_builds_no_dropout_modules():
    for overrides in ({}, LLAMA_STYLE):
        assert not [m for m in small_model(**overrides).modules() if isinstance(m, nn.Dropout)]
        dropped = small_model(dropout=0.1, **overrides)
        # embeddings, and per block the attention output and the MLP output
        assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 1 + 2 * dropped.config.n_layer


@pytest.mark.parametrize("overrides", [{}, LLAMA_STYLE], ids=["classic", "llama"])
def test_dropout_is_active_in_training_and_absent_in_eval(overrides):
    dropped = small_model(seed=22, dropout=0.2, **overrides)
    plain = tg.GPT(small_config(dropout=0.0, **overrides))
    plain.load_state_dict(dropped.state_dict())
    plain.eval()
    idx = tokens((2, 24), seed=23)
    with torch.no_grad():
        dropped.train()
        torch.manual_seed(0)
        a = dropped(idx)[0]
        torch.manual_seed(1)
        b = dropped(idx)[0]
        torch.manual_seed(0)
        a_again = dropped(idx)[0]
        dropped.eval()
        e1, e2 = dropped(idx)[0], dropped(idx)[0]
        ref = plain(idx)[0]
    assert (a[..., :V] - b[..., :V]).abs().max().item() > 1e-2
    assert torch.equal(a, a_again)
    assert torch.equal(e1, e2)
    assert torch.allclose(e1, ref, rtol=0, atol=1e-6)
    assert (a[..., :V] - ref[..., :V]).abs().max().item() > 1e-2


def test_attention_dropout_is_applied_in_training():
    """Only the attention probabilities are dropped here: resid/MLP/embedding dropout modules are switched off."""
    model = small_model(seed=24, dropout=0.5).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    idx = tokens((1, 16), seed=25)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(idx)[0]
        torch.manual_seed(1)
        b = model(idx)[0]
    assert (a[..., :V] - b[..., :V]).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# int8 copy for sampling (sample.py)


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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_model_is_close_and_leaves_the_original_alone(variant):
    model = small_model(seed=27, std=0.05, **VARIANTS[variant])
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


# ----------------------------------------------------------------------------------------------------------------
# export to a Hugging Face directory

EXPORTS = {
    "gpt2": dict(mlp_hidden=160),  # a non-default MLP width, so that n_inner must be written
    "gpt2_untied": dict(tie_embeddings=False),
    "llama": dict(LLAMA_STYLE, n_kv_head=2, rope_theta=500000.0),
    "llama_untied": dict(LLAMA_STYLE, n_kv_head=1, tie_embeddings=False),
}
EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt"}


def gpt2_vocab_model(seed: int, block_size: int = 64, **overrides) -> tg.GPT:
    torch.manual_seed(seed)
    config = tg.GPTConfig(block_size=block_size, n_layer=2, n_head=4, n_embd=64, **overrides)
    assert (config.vocab_size, config.padded_vocab_size) == (GPT2_V, 50304)
    return randomize_(tg.GPT(config), seed=seed + 100, std=0.1).eval()


_gpt2_tokenizer_files = ex.gpt2_tokenizer_files


@functools.lru_cache(maxsize=1)
def tokenizer_files() -> dict[str, str]:
    return _gpt2_tokenizer_files()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each exportable mix, randomized and exported into a parent directory of its own."""
    out = {}
    # the tokenizer files are the same for every export: recover them from the ranks once for this module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "gpt2_tokenizer_files", tokenizer_files)
        for k, (name, overrides) in enumerate(EXPORTS.items()):
            model = gpt2_vocab_model(seed=40 + k, **overrides)
            parent = tmp_path_factory.mktemp(f"export_{name}")
            target = parent / "model"
            layout = ex.export_hf(model, str(target))
            out[name] = dict(model=model, dir=str(target), parent=str(parent), layout=layout)
    return out


@pytest.fixture(scope="module")
def hf_models(exports):
    transformers = quiet_transformers()
    loaded = {}
    for name, e in exports.items():
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(e["dir"], output_loading_info=True)
        loaded[name] = (hf.float().eval(), info)
    return loaded


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_logits_match_transformers(name, exports, hf_models):
    e = exports[name]
    model, (hf, info) = e["model"], hf_models[name]
    expected_layout = "gpt2" if name.startswith("gpt2") else "llama"
    assert e["layout"] == expected_layout == tg.hf_layout(model.config)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[expected_layout]
    with open(os.path.join(e["dir"], "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [type(hf).__name__]
    assert config["vocab_size"] == GPT2_V
    # every weight came from the file: nothing left at its random initialisation, nothing ignored
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.get_input_embeddings().weight.shape == (GPT2_V, 64)
    assert hf.get_output_embeddings().weight.shape == (GPT2_V, 64)
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert tied == model.config.tie_embeddings
    idx = tokens((2, 64), seed=41, high=GPT2_V)
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _ = model(idx)
    assert ref.shape == (2, 64, GPT2_V)
    assert (ours[..., :GPT2_V] - ref).abs().max().item() <= 1e-4
    assert ref.std().item() > 0.5
    # greedy generate() continues a prompt with our sampler's tokens (up to an end-of-text, where it stops)
    prompt = tokens((1, 5), seed=42, high=GPT2_V)
    with torch.no_grad():
        greedy = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=GPT2_V - 1)
    assert greedy.size(1) > 6 and torch.equal(greedy, model.generate(prompt, 10, top_k=1)[:, :greedy.size(1)])


@pytest.mark.parametrize("name", list(EXPORTS))
def test_exported_safetensors_hold_our_weights(name, exports, hf_models):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    e = exports[name]
    model, (hf, _) = e["model"], hf_models[name]
    path = os.path.join(e["dir"], "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # exactly the tensors Hugging Face's model is made of (a tied head once), with the values it loaded
    hf_state = hf.state_dict()
    params = {n for n, _ in hf.named_parameters()}  # shared tensors counted once
    assert set(tensors) == params
    assert all(torch.equal(tensors[n], hf_state[n]) for n in tensors)
    # and those are our weights, cut and split as the layouts define them
    sd = model.state_dict()
    c = model.config
    hd, H = c.head_dim, c.mlp_hidden
    if name.startswith("gpt2"):
        emb = tensors["transformer.wte.weight"]
        assert torch.equal(tensors["transformer.wpe.weight"], sd["transformer.wpe.weight"])
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for leaf in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
                assert torch.equal(tensors[p + leaf], sd[p + leaf].T), leaf  # Conv1D: (in, out)
            for leaf in ("attn.c_attn.bias", "mlp.c_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.bias"):
                assert torch.equal(tensors[p + leaf], sd[p + leaf]), leaf
        assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (64, H)
    else:
        emb = tensors["model.embed_tokens.weight"]
        q, kv = c.n_head * hd, c.n_kv_head * hd
        for i in range(c.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            w = sd[ours + "attn.c_attn.weight"]
            assert torch.equal(tensors[theirs + "self_attn.q_proj.weight"], w[:q])
            assert torch.equal(tensors[theirs + "self_attn.k_proj.weight"], w[q: q + kv])
            assert torch.equal(tensors[theirs + "self_attn.v_proj.weight"], w[q + kv:])
            fc = sd[ours + "mlp.c_fc.weight"]
            assert torch.equal(tensors[theirs + "mlp.gate_proj.weight"], fc[:H])
            assert torch.equal(tensors[theirs + "mlp.up_proj.weight"], fc[H:])
            assert torch.equal(tensors[theirs + "mlp.down_proj.weight"], sd[ours + "mlp.c_proj.weight"])
            assert torch.equal(tensors[theirs + "input_layernorm.weight"], sd[ours + "ln_1.weight"])
        assert torch.equal(tensors["model.norm.weight"], sd["transformer.ln_f.weight"])
    assert torch.equal(emb, sd["transformer.wte.weight"][:GPT2_V])
    if c.tie_embeddings:
        assert "lm_head.weight" not in tensors
    else:
        assert torch.equal(tensors["lm_head.weight"], sd["lm_head.weight"][:GPT2_V])
    # the container itself: 8-byte little-endian header length, a JSON header, data starting 8-byte aligned
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    data_bytes = os.path.getsize(path) - 8 - n
    assert sum(t.numel() * 4 for t in tensors.values()) == data_bytes
    assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == data_bytes


def test_write_safetensors_round_trips_through_the_safetensors_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(42)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.c": torch.randn(7, generator=g),
               "scalar_row": torch.randn(1, 1, generator=g), "t": torch.randn(4, 6, generator=g).T}  # non-contiguous
    ex.write_safetensors(str(tmp_path / "x.safetensors"), tensors)
    back = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert os.listdir(tmp_path) == ["x.safetensors"]


@pytest.mark.parametrize("name", list(EXPORTS))
def test_from_pretrained_round_trips_an_export(name, exports):
    quiet_transformers()
    e = exports[name]
    model = e["model"]
    back = tg.GPT.from_pretrained(e["dir"]).eval()
    fields = ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "norm",
              "pos", "rope_theta", "mlp", "mlp_hidden", "bias", "tie_embeddings")
    assert {f: getattr(back.config, f) for f in fields} == {f: getattr(model.config, f) for f in fields}
    idx = tokens((2, 64), seed=43, high=GPT2_V)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_directory_is_complete_and_nothing_else_is_left(name, exports):
    e = exports[name]
    assert os.listdir(e["parent"]) == ["model"]  # no temporary directory beside it
    assert set(os.listdir(e["dir"])) == EXPORT_FILES  # no temporary file in it
    for fname, text in tokenizer_files().items():
        with open(os.path.join(e["dir"], fname), encoding="utf-8") as f:
            assert f.read() == text, fname
    with open(os.path.join(e["dir"], "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == gen["bos_token_id"] == 50256
    vocab = json.loads(tokenizer_files()["vocab.json"])
    assert len(vocab) == GPT2_V and sorted(vocab.values()) == list(range(GPT2_V))
    assert vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262 and vocab["Hello"] == 15496


def corpus_text(n_chars: int = 300_000) -> str:
    pd = pytest.importorskip("pandas")
    texts = pd.read_parquet(CORPUS, columns=["text"])["text"].tolist()
    assert len(texts) > 20
    pieces = [texts[i][:n_chars // 3] for i in (0, len(texts) // 2, len(texts) - 1)]
    extra = ("naïve café — “quoted” ‘text’ … 日本語のテキスト 한국어 Ελληνικά русский עברית 🤖👍🏽🇫🇷 ﬁ\u00a0nbsp "
             "\u3000ideographic\u2028line\u0085nel \t\t tabs\n\n\n\n   spaces   \r\n\r\ncrlf   \n \n"
             "don't DON'T we'll I'VE it's 12345678901 3.14159 $1,000,000 #hashtag @user <html> zero\u200bwidth  ")
    return "\n\n".join(pieces) + extra * 3


def test_exported_tokenizer_encodes_like_tiktoken(exports):
    transformers = quiet_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(exports["gpt2"]["dir"])
    enc = tg.get_tokenizer()
    text = corpus_text()
    assert len(text.encode()) > 250_000
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ref = enc.encode_ordinary(text)
    assert len(ref) > 50_000
    if ids != ref:
        first = next(i for i, (a, b) in enumerate(zip(ids, ref)) if a != b)
        pytest.fail(f"first difference at token {first}: {ids[first - 3: first + 3]} vs {ref[first - 3: first + 3]}")
    assert tok("<|endoftext|>", add_special_tokens=False)["input_ids"] == [50256]
    assert tok("a<|endoftext|>b", add_special_tokens=False)["input_ids"] == [enc.encode_ordinary("a")[0], 50256,
                                                                             enc.encode_ordinary("b")[0]]
    assert tok.eos_token_id == 50256
    assert tok.decode(ref[:2000], clean_up_tokenization_spaces=False) == enc.decode(ref[:2000])


@pytest.mark.parametrize("overrides,flags", [
    (dict(norm="rmsnorm"), "--norm rmsnorm --pos learned"),
    (dict(bias=False), "--no-bias"),
    (dict(n_kv_head=2), "--n_kv_head 2"),
    (dict(pos="rope"), "--pos rope --mlp gelu"),
    (dict(LLAMA_STYLE, bias=True), "--mlp swiglu --bias"),
    (dict(LLAMA_STYLE, mlp="gelu"), "--mlp gelu --no-bias"),
], ids=["rmsnorm_learned", "classic_no_bias", "gpt2_gqa", "rope_gelu", "llama_bias", "llama_gelu"])
def test_mixes_without_a_hugging_face_layout_export_with_their_own_code(overrides, flags, tmp_path):
    """Neither GPT-2 nor Llama computes these mixes: the export ships our model code (trust_remote_code), and
    transformers' model from it gives our logits."""
    transformers = quiet_transformers()
    model = gpt2_vocab_model(seed=47, **overrides)
    assert tg.hf_layout(model.config) == "custom"
    assert ex.export_hf(model, str(tmp_path / "out")) == "custom"
    assert set(os.listdir(tmp_path / "out")) == EXPORT_FILES | {f"{ex.HF_REMOTE_MODULE}.py"}
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not any(info.values())
    idx = tokens((2, 32), seed=48, high=GPT2_V)
    with torch.no_grad():
        ref = hf.float().eval()(idx).logits
        ours, _ = model(idx)
    assert (ours[..., :GPT2_V] - ref).abs().max().item() <= 1e-4 and ref.std().item() > 0.5


def test_existing_directory_is_refused_and_left_alone(tmp_path):
    model = gpt2_vocab_model(seed=44)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for target in (occupied, a_file):
        with pytest.raises(tg.UserError, match="already exists"):
            ex.export_hf(model, str(target))
    assert sorted(os.listdir(tmp_path)) == ["a_file", "occupied"]
    assert os.listdir(occupied) == ["notes.txt"] and (occupied / "notes.txt").read_text() == "keep me"
    assert a_file.read_text() == "not a directory"
    # an empty directory is taken
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "gpt2_tokenizer_files", tokenizer_files)
        assert ex.export_hf(model, str(empty)) == "gpt2"
    assert set(os.listdir(empty)) == EXPORT_FILES
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty", "occupied"]


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = gpt2_vocab_model(seed=45, **LLAMA_STYLE)
    real = ex.write_safetensors

    def full_disk(path, tensors):
        real(path, tensors)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "gpt2_tokenizer_files", tokenizer_files)
    monkeypatch.setattr(ex, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space"):
        ex.export_hf(model, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# names every module has without defining them
MODULE_DUNDERS = {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__", "__builtins__"}


def undefined_globals(source: str) -> set[str]:
    """The global names `source` reads (in any scope) that it neither assigns nor imports at module level and that
    are not builtins: each one a NameError waiting for the code path that reads it."""
    top = symtable.symtable(source, "modeling", "exec")
    tables, used, defined = [top], set(), set()
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            global_here = table is top or symbol.is_global()
            if global_here and (symbol.is_assigned() or symbol.is_imported()):
                defined.add(symbol.get_name())  # at module level, or through a `global` statement
            if global_here and symbol.is_referenced():
                used.add(symbol.get_name())
    return used - defined - set(dir(builtins)) - MODULE_DUNDERS


def test_custom_modeling_file_defines_every_global_name_it_uses():
    code = ex.hf_remote_code()
    assert undefined_globals(code) == set()


@pytest.mark.parametrize("pattern, name", [
    (r"^def softcap\(.*?(?=^\S)", "softcap"),  # a kernel function, up to the next top-level line
    (r"^SOFTMAX_BLOCK_ROWS = [^\n]*\n", "SOFTMAX_BLOCK_ROWS"),  # a kernels constant
    (r"^class UserError\(.*?(?=^\S)", "UserError"),  # a preamble class
], ids=["function", "constant", "preamble"])
def test_global_name_check_reports_a_removed_definition(pattern, name):
    code = ex.hf_remote_code()
    cut = re.sub(pattern, "", code, count=1, flags=re.M | re.S)
    assert len(cut) < len(code)
    assert undefined_globals(cut) == {name}


def top_level_names(source: str, first_line: int = 1, last_line: int | None = None) -> set[str]:
    """Names defined by the top-level statements of `source` that start within the given lines (1-based)."""
    names = set()
    for node in ast.parse(source).body:
        if node.lineno < first_line or (last_line is not None and node.lineno > last_line):
            continue
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_custom_modeling_file_holds_the_config_kernels_and_model_sections_in_full():
    """Cut train_gpt2.py at its banners here, independently of export_hf: every one of the three sections is in the
    modeling file verbatim, and each thing one defines at top level is defined there."""
    with open(tg.__file__, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"# -+", line.rstrip("\n"))]
    spans = {re.match(r"# ([^:\n]+)", lines[s + 1]).group(1).strip(): (s, e) for s, e in zip(starts, starts[1:])}
    code = ex.hf_remote_code()
    defined = top_level_names(code)
    expected = set()
    for name in ("config", "kernels", "model"):
        start, end = spans[name]
        assert "".join(lines[start:end]) in code, name
        names = top_level_names(source, start + 1, end)
        assert names and names <= defined, (name, names - defined)
        expected |= names
    assert {"GPTConfig", "gelu_tanh_via_sigmoid", "softcap", "ChunkedCrossEntropy", "GPT", "hf_weight_map"} <= expected
    # the preamble too (constants, UserError), under the modeling file's own docstring instead of train_gpt2's
    assert {"GPT2_VOCAB_SIZE", "EOT_TOKEN", "UserError"} <= defined
    assert ast.get_docstring(ast.parse(code)).startswith("GPT from gpt2-trainer") and tg.__doc__ not in code
    assert code.count("from __future__ import annotations") == 1
    with pytest.raises(ValueError, match="no section 'nowhere'"):
        ex.trainer_sections(["config", "nowhere"])


# ----------------------------------------------------------------------------------------------------------------
# command lines: export a training checkpoint, then score it on HellaSwag both ways

CLI_MODELS = {"classic": {}, "llama": dict(LLAMA_STYLE, n_kv_head=2, tie_embeddings=False),
              "speedrun": dict(norm="rmsnorm", pos="rope", mlp="relu2", bias=False, qk_norm=True, embed_norm=True,
                               x0_lambdas=True, logit_softcap=15.0, tie_embeddings=False)}
CLI_LAYOUTS = {"classic": "gpt2", "llama": "llama", "speedrun": "custom"}


def run_exports(jobs: dict) -> dict:
    """`python export_hf.py CKPT DIR` for each job at once, offline and single-threaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = {name: subprocess.Popen([sys.executable, EXPORT_SCRIPT, ckpt, out_dir],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for name, (ckpt, out_dir) in jobs.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


def hellaswag_cli(argv: list[str]) -> tuple[int, str, str]:
    """hellaswag_eval's command line, in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    import hellaswag_eval as H

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = H.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Checkpoints of a GPT-2-layout and a Llama-layout model, exported by export_hf.py's command line, then scored
    by hellaswag_eval's command line from the checkpoint and from the exported directory."""
    quiet_transformers()
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for k, (name, overrides) in enumerate(CLI_MODELS.items()):
        model = gpt2_vocab_model(seed=50 + k, **overrides)
        ckpt = str(root / f"{name}.pt")
        torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 1}, ckpt)
        runs[name] = dict(model=model, ckpt=ckpt, dir=str(root / f"{name}_hf"))
    exported = run_exports({name: (r["ckpt"], r["dir"]) for name, r in runs.items()})
    listing = sorted(os.listdir(root))
    for name, r in runs.items():
        r["export"] = exported[name]
        r["listing"] = listing
        if exported[name].returncode != 0:
            continue
        for source, arg in (("checkpoint", ["--checkpoint", r["ckpt"]]), ("hf", ["--hf_model", r["dir"]])):
            out = str(root / "scores" / f"{name}_{source}.json")
            r[source + "_json"] = out
            r[source] = hellaswag_cli([*arg, "--data_file", SAMPLE, "--device", "cpu", "--dtype", "fp32",
                                       "--batch_size", "4", "--no_progress", "--out", out])
    return runs


@pytest.mark.parametrize("name", list(CLI_MODELS))
def test_cli_export_of_a_checkpoint_loads_in_transformers(name, cli_runs):
    transformers = quiet_transformers()
    r = cli_runs[name]
    proc = r["export"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = CLI_LAYOUTS[name]
    assert f"as a Hugging Face {layout} model" in proc.stdout
    code = {f"{ex.HF_REMOTE_MODULE}.py"} if layout == "custom" else set()
    assert set(os.listdir(r["dir"])) == EXPORT_FILES | code
    # nothing but the checkpoints and the exported directories (no temporary directory left)
    assert r["listing"] == sorted([f"{n}.pt" for n in CLI_MODELS] + [f"{n}_hf" for n in CLI_MODELS])
    hf = transformers.AutoModelForCausalLM.from_pretrained(r["dir"], trust_remote_code=layout == "custom").eval()
    model = tg.load_checkpoint_model(r["ckpt"])
    idx = tokens((1, 64), seed=51, high=GPT2_V)
    with torch.no_grad():
        ref = hf(idx).logits
        ours = r["model"](idx)[0]
        assert torch.equal(model(idx)[0], ours)
    assert (ours[..., :GPT2_V] - ref).abs().max().item() <= 1e-4


def hellaswag_result(run, path) -> dict:
    rc, stdout, stderr = run
    assert rc == 0, stderr[-3000:]
    with open(path) as f:
        saved = json.load(f)
    line = [x for x in stdout.splitlines() if x.startswith("hellaswag n=")]
    assert len(line) == 1 and f"acc={saved['acc']:.4f} acc_norm={saved['acc_norm']:.4f}" in line[0]
    return saved


@pytest.mark.parametrize("name", list(CLI_MODELS))
def test_hellaswag_scores_checkpoint_and_export_alike(name, cli_runs):
    transformers = quiet_transformers()
    import hellaswag_eval as H

    r = cli_runs[name]
    assert r["export"].returncode == 0, r["export"].stderr[-3000:]
    from_ckpt = hellaswag_result(r["checkpoint"], r["checkpoint_json"])
    from_hf = hellaswag_result(r["hf"], r["hf_json"])
    examples = H.load_examples(SAMPLE)
    keys = ("n", "acc", "acc_norm", "correct", "correct_norm")
    assert from_ckpt["n"] == len(examples) == 13
    assert {k: from_hf[k] for k in keys} == {k: from_ckpt[k] for k in keys}
    # example by example, straight from the models: every ending's loss under the saved model and under the model
    # Hugging Face loads from the export agree, hence every prediction, and the counts follow from them
    hf = transformers.AutoModelForCausalLM.from_pretrained(r["dir"], trust_remote_code=name == "speedrun").eval()
    ours = H.score(r["model"], examples, batch_size=4, autocast_dtype=torch.float32)
    theirs = H.score(lambda idx: hf(input_ids=idx).logits, examples, batch_size=4, autocast_dtype=torch.float32,
                     max_seq_len=H.context_length(hf))
    assert (ours["loss_sum"] - theirs["loss_sum"]).abs().max().item() <= 1e-3
    assert (ours["loss_mean"] - theirs["loss_mean"]).abs().max().item() <= 1e-4
    labels = torch.tensor([ex["label"] for ex in examples])
    for metric, column in (("loss_sum", "correct"), ("loss_mean", "correct_norm")):
        assert torch.equal(ours[metric].argmin(1), theirs[metric].argmin(1))
        assert from_ckpt[column] == int((ours[metric].argmin(1) == labels).sum())
        # no near-ties that a rounding difference could flip
        best_two = ours[metric].topk(2, dim=1, largest=False).values
        assert (best_two[:, 1] - best_two[:, 0]).min().item() > 1e-3
    assert from_ckpt["acc"] == from_ckpt["correct"] / 13 and from_ckpt["acc_norm"] == from_ckpt["correct_norm"] / 13


def test_cli_export_refuses_an_occupied_directory_or_a_file_in_the_way(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    cases = []
    model = tg.GPT(small_config())
    ckpt = str(tmp_path / "classic.pt")
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, ckpt)
    cases.append((ckpt, str(occupied), "already exists"))
    cases.append((ckpt, str(tmp_path / "classic.pt"), "already exists"))  # a file in the way
    for path, out_dir, message in cases:
        with pytest.raises(SystemExit) as e:
            ex.main([path, out_dir])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["classic.pt", "occupied"]
    assert os.listdir(occupied) == ["keep.txt"]
