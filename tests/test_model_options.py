"""
The model options beyond GPT-2 as released: rotary position embeddings, grouped-query attention, the KV cache,
activation checkpointing, SwiGLU, bias-free and untied models, dropout, and the speedrun options (logit softcap, QK
norm, ReLU^2, x0 lambdas, embedding norm, zero init).

Every check compares against a computation written out here (complex rotations, an explicit softmax attention, the
uncached forward, float64 references) rather than against recorded numbers. Models are tiny and fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt2 as tg
from conftest import (
    GPT2_V,
    LLAMA_STYLE,
    MODEL_VARIANTS,
    VP,
    V,
    is_vector,
    loss_and_grads,
    randomize_,
    small_gpt2,
    small_model,
    tiny_config,
    tokens,
)

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after


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


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_incremental_forward_matches_full_forward(variant):
    model = small_model(seed=7, **MODEL_VARIANTS[variant])
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


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
@pytest.mark.parametrize("prompt_len", [5, 20])
def test_generate_with_and_without_cache_agree_past_block_size(variant, prompt_len):
    model = small_model(seed=12, std=0.15, block_size=16, **MODEL_VARIANTS[variant])
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


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.parametrize("variant", ["classic", "modern", "untied"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant, dropout, monkeypatch):
    model = small_model(seed=14, std=0.05, dropout=dropout, **MODEL_VARIANTS[variant]).train()
    idx, y = tokens((2, 32), seed=15), tokens((2, 32), seed=16)
    _, plain_loss, plain = loss_and_grads(model, idx, y, seed=3)

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.activation_checkpointing = True
    _, ckpt_loss, ckpt = loss_and_grads(model, idx, y, seed=3)
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
        _, other_loss, _ = loss_and_grads(model, idx, y, seed=4)
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
    plain = tg.GPT(tiny_config(dropout=0.0, **overrides))
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


# ---------------------------------------------------------------------------------------------------------------
# the speedrun options: logit softcap, QK norm, ReLU^2 MLP, x0 lambdas and embedding norm, zero init


def test_logit_softcap_loss_matches_float64_and_chunked_equals_plain():
    model = randomize_(small_gpt2(logit_softcap=5.0, tie_embeddings=False), std=0.3, seed=1, around_one=is_vector)
    idx, targets = tokens((3, 40), high=GPT2_V), tokens((3, 40), seed=1, high=GPT2_V)
    targets[0, :7] = -1
    with torch.no_grad():
        x = model.transformer.ln_f(model.transformer.h[1](model.transformer.h[0](
            model.transformer.wte(idx) + model.transformer.wpe(torch.arange(40)))))
    z = x.double() @ model.lm_head.weight.double().T
    capped = 5.0 * torch.tanh(z / 5.0)
    capped[..., tg.GPT2_VOCAB_SIZE:] = float("-inf")  # the padding ids stay impossible after the cap
    ref = F.cross_entropy(capped.view(-1, capped.size(-1)), targets.view(-1), ignore_index=-1)

    model.train()
    losses, grads = [], []
    for chunked in (False, True):
        model.zero_grad()
        model.chunked_loss = chunked
        logits, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if not chunked:
            assert logits.abs()[..., :tg.GPT2_VOCAB_SIZE].max() <= 5.0
            assert torch.isneginf(logits[..., tg.GPT2_VOCAB_SIZE:]).all()
    assert losses[0] == pytest.approx(ref.item(), rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-5 * g.abs().max().item(), msg=name)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    for qk_norm in (True, False):
        model = randomize_(small_gpt2(qk_norm=qk_norm), seed=1, around_one=is_vector)
        attn = model.transformer.h[0].attn
        with torch.no_grad():
            before = attn(x)
            attn.c_attn.weight[:128] *= 7.0  # the query and key rows (q | k | v)
            attn.c_attn.bias[:128] *= 7.0
            after = attn(x)
        if qk_norm:
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        else:
            assert (after - before).abs().max() > 1e-2


def test_qk_norm_is_a_per_head_rmsnorm_with_learned_gains():
    model = randomize_(small_gpt2(qk_norm=True, bias=False), seed=1, around_one=is_vector)
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(4))
    q, k, v = (x @ attn.c_attn.weight.T).split(64, dim=-1)
    heads = lambda t: t.view(1, 8, 2, 32).transpose(1, 2).double()  # noqa: E731
    rms = lambda t, g: t / (t.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * g.double()  # noqa: E731
    q, k, v = rms(heads(q), attn.q_norm.weight), rms(heads(k), attn.k_norm.weight), heads(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(32)
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 8, 64) @ attn.c_proj.weight.double().T
    with torch.no_grad():
        torch.testing.assert_close(attn(x).double(), y, rtol=1e-4, atol=1e-5)


def test_relu2_mlp_is_relu_squared():
    model = randomize_(small_gpt2(mlp="relu2"), seed=1, around_one=is_vector)
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (256, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5)).double()
    h = x @ mlp.c_fc.weight.double().T + mlp.c_fc.bias.double()
    ref = torch.clamp(h, min=0) ** 2 @ mlp.c_proj.weight.double().T + mlp.c_proj.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x.float()).double(), ref, rtol=1e-4, atol=1e-4)


def test_x0_lambdas_and_embed_norm_mix_the_embedding_into_every_block():
    model = randomize_(small_gpt2(x0_lambdas=True, embed_norm=True, norm="rmsnorm", pos="rope", bias=False), seed=1,
                       around_one=is_vector)
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([0.7, 1.3]))
        model.x0_lambdas.copy_(torch.tensor([0.4, -0.2]))
    idx = tokens((2, 12), high=GPT2_V)
    t = model.transformer
    with torch.no_grad():
        x0 = t.ln_e(t.wte(idx))
        x = x0
        for i, block in enumerate(t.h):
            x = block(model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0, model.rotary(0, 12))
        ref = F.linear(t.ln_f(x), model.lm_head.weight, model.vocab_mask)
        torch.testing.assert_close(model(idx)[0], ref, rtol=0, atol=0)


def test_zero_init_starts_every_block_as_the_identity_and_the_head_uniform():
    model = small_gpt2(zero_init=True, tie_embeddings=False, x0_lambdas=True, mlp="relu2", qk_norm=True)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert p.abs().max() == 0, name
        elif name.endswith("c_attn.weight"):
            assert p.std().item() == pytest.approx(0.02, rel=0.1)
    idx, targets = tokens((2, 20), high=GPT2_V), tokens((2, 20), seed=1, high=GPT2_V)
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(tg.GPT2_VOCAB_SIZE), rel=1e-6)  # uniform over the real ids
    model.train()
    model(idx, targets)[1].backward()  # only the head sees a gradient at first; after its first update, all do
    assert model.lm_head.weight.grad.abs().max() > 0
    with torch.no_grad():
        model.lm_head.weight -= 0.1 * model.lm_head.weight.grad
    model.zero_grad()
    model(idx, targets)[1].backward()
    assert model.transformer.h[0].mlp.c_proj.weight.grad.abs().max() > 0
