"""
Checks for the model of train_gpt2.py as GPT-2 was released: parity with Hugging Face's GPT2LMHeadModel, causality,
weight tying, parameter counts, initialisation statistics, gradient accumulation, vocabulary masking in generation,
bf16 autocast and the size presets. Models are tiny and fp32 (this CPU emulates bf16), except where a statistic or a
published count needs the real size. The options beyond GPT-2 are tested in test_model_options.py, the optimizers
and the learning-rate schedule in test_optim.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import VP, V, quiet_transformers, randomize_, tiny_model, tokens
from train_gpt2 import GPT, PRESETS, GPTConfig, UserError, model_config

GPT2_SMALL_PARAMS = 124_439_808  # GPT-2 small (124M) as released and as Hugging Face counts it, embeddings tied


# ----------------------------------------------------------------------------------------------------------------
# parity with Hugging Face's GPT-2


def hf_gpt2(**overrides):
    """A small random GPT2LMHeadModel built from a config alone (no download), in eval mode with no dropout."""
    transformers = quiet_transformers()
    values = dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    config = transformers.GPT2Config(**values)
    config._attn_implementation = "eager"  # explicit softmax(QK^T)V: independent of the SDPA kernel under test
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config)
    randomize_(hf, seed=1, std=0.1)
    return hf.eval()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    hf = hf_gpt2()
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return hf, GPT.from_pretrained(str(path)).eval()


def test_from_pretrained_logits_match_hugging_face(hf_pair):
    hf, model = hf_pair
    idx = tokens((2, 64), seed=2)
    with torch.no_grad():
        ref = hf(idx).logits
        logits, loss = model(idx)
    assert loss is None
    assert ref.shape == (2, 64, V)
    assert logits.shape == (2, 64, model.config.padded_vocab_size)
    assert logits.dtype == torch.float32
    assert (logits[..., :V] - ref).abs().max().item() <= 1e-4
    assert ref.std().item() > 0.5  # logits big enough that a missing bias or LayerNorm gain would show
    assert torch.all(logits[..., V:] == float("-inf"))


def test_from_pretrained_loss_matches_hugging_face(hf_pair):
    hf, model = hf_pair
    idx = tokens((2, 64), seed=3)
    # HF predicts labels[:, 1:] from logits[:, :-1]; here targets are explicit, the last position ignored (-1)
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)
    with torch.no_grad():
        ref_loss = hf(idx, labels=idx).loss
        logits, loss = model(idx, targets)
    # and independently of HF's loss: mean negative log-probability of the next token over the 2 * 63 positions
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, idx[:, 1:, None]).mean()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert abs(loss.item() - nll.item()) <= 1e-5


def test_from_pretrained_keeps_published_shapes_and_zero_padding(hf_pair):
    hf, model = hf_pair
    c = model.config
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (64, V, 2, 4, 64)
    assert c.padded_vocab_size >= V
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:V], hf.transformer.wte.weight)
    assert torch.all(wte[V:] == 0)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


def test_from_pretrained_unreadable_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="save_pretrained"):
        GPT.from_pretrained(str(tmp_path / "no_such_model"))


@pytest.mark.parametrize("override", [dict(activation_function="relu"), dict(layer_norm_epsilon=1e-6),
                                      dict(scale_attn_by_inverse_layer_idx=True)],
                         ids=["relu", "layer_norm_epsilon", "scale_attn_by_inverse_layer_idx"])
def test_from_pretrained_refuses_variants_it_cannot_represent(tmp_path, override):
    hf_gpt2(**override).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=next(iter(override)).split("_")[0]):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("override", [dict(tie_word_embeddings=False), dict(n_inner=96)], ids=["untied", "n_inner"])
def test_from_pretrained_untied_head_and_other_mlp_widths_match_hugging_face(tmp_path, override):
    hf = hf_gpt2(**override)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.tie_embeddings == override.get("tie_word_embeddings", True)
    assert model.config.mlp_hidden == override.get("n_inner", 4 * 64)
    idx = tokens((2, 64), seed=4)
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = model(idx)
    assert (logits[..., :V] - ref).abs().max().item() <= 1e-4
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


# ----------------------------------------------------------------------------------------------------------------
# causality


def test_later_tokens_never_change_earlier_logits():
    model = randomize_(tiny_model(), seed=4).eval()
    T = 48
    idx = tokens((2, T), seed=5)
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 1, 17, T - 2):
            changed = idx.clone()
            changed[:, t + 1:] = tokens((2, T - t - 1), seed=100 + t)
            assert not torch.equal(changed, idx)
            out, _ = model(changed)
            assert (out[:, : t + 1, :V] - base[:, : t + 1, :V]).abs().max().item() <= 1e-6, t
            assert torch.all(out[..., V:] == float("-inf"))
            # and the test can fail: the changed positions themselves do see the change
            assert (out[:, t + 1:, :V] - base[:, t + 1:, :V]).abs().max().item() > 1e-2, t


def test_a_token_reaches_every_later_position():
    model = randomize_(tiny_model(), seed=6).eval()
    idx = tokens((1, 32), seed=7)
    changed = idx.clone()
    changed[0, 3] = (idx[0, 3] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    diff = (a[0, :, :V] - b[0, :, :V]).abs().amax(dim=-1)
    assert torch.all(diff[:3] <= 1e-6)
    assert torch.all(diff[3:] > 1e-4)


def test_sequence_longer_than_block_size_is_refused():
    model = tiny_model(block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    logits, _ = model(torch.zeros(1, 16, dtype=torch.long))
    assert logits.shape == (1, 16, VP)


# ----------------------------------------------------------------------------------------------------------------
# tied embeddings


def assert_tied(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight
    named = dict(model.named_parameters())
    assert "transformer.wte.weight" in named or "lm_head.weight" in named
    assert sum(1 for p in model.parameters() if p is model.lm_head.weight) == 1


def test_weights_tied_after_init():
    assert_tied(tiny_model())


def test_weights_tied_after_from_pretrained(hf_pair):
    assert_tied(hf_pair[1])


def test_weights_tied_after_load_state_dict(tmp_path):
    source = randomize_(tiny_model(seed=1), seed=8)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"transformer.wte.weight", "lm_head.weight"}
    target = tiny_model(seed=2)
    target.load_state_dict(state)
    assert_tied(target)
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)
    idx = tokens((2, 16), seed=9)
    with torch.no_grad():
        assert torch.equal(target(idx)[0], source(idx)[0])


def test_weights_tied_after_compile():
    torch._dynamo.reset()
    model = randomize_(tiny_model(n_layer=1, n_head=2, n_embd=32), seed=10)
    reference = copy.deepcopy(model)
    # aot_eager runs dynamo and AOTAutograd as the default backend does, without minutes of C++ code generation
    compiled = torch.compile(model, backend="aot_eager")
    assert compiled._orig_mod is model
    assert_tied(compiled._orig_mod)
    assert len(list(compiled.parameters())) == len(list(reference.parameters()))
    idx, y = tokens((2, 16), seed=11), tokens((2, 16), seed=12)
    logits, loss = compiled(idx, y)
    ref_logits, ref_loss = reference(idx, y)
    # compiled on a CPU, the GELU and the attention are spelled-out forms of the same functions: fp32 rounding apart
    assert torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad
    torch._dynamo.reset()


def test_tied_weight_gradient_sums_both_uses():
    tied = randomize_(tiny_model(), seed=13)
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = nn.Parameter(untied.transformer.wte.weight.detach().clone())
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    idx, y = tokens((2, 24), seed=14), tokens((2, 24), seed=15)
    tied(idx, y)[1].backward()
    untied(idx, y)[1].backward()
    g_embed, g_head = untied.transformer.wte.weight.grad, untied.lm_head.weight.grad
    assert g_embed.abs().max() > 0 and g_head.abs().max() > 0  # both uses contribute
    assert torch.allclose(tied.lm_head.weight.grad, g_embed + g_head, rtol=1e-5, atol=1e-8)
    # the embedding gradient lives on the input tokens' rows only; the head's on every real row, none on padding
    assert torch.all(g_head[V:] == 0)
    unused = torch.ones(VP, dtype=torch.bool)
    unused[idx.unique()] = False
    assert torch.all(g_embed[unused] == 0)


# ----------------------------------------------------------------------------------------------------------------
# parameter counts


def test_gpt2_small_parameter_count_matches_published_and_hugging_face():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = GPT(model_config("gpt2"))
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    hf_unique = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert hf_unique == GPT2_SMALL_PARAMS
    assert model.num_params() == GPT2_SMALL_PARAMS
    padding_rows = model.config.padded_vocab_size - model.config.vocab_size
    assert model.num_params(exclude_padding=False) == GPT2_SMALL_PARAMS + padding_rows * 768


def test_num_params_counts_each_tensor_once():
    model = tiny_model()
    every = list(model.named_parameters(remove_duplicate=False))
    unique = {id(p): p for _, p in every}
    assert len(every) == len(unique) + 1  # lm_head.weight and transformer.wte.weight are one tensor
    total = sum(p.numel() for p in unique.values())
    assert model.num_params(exclude_padding=False) == total
    assert model.num_params() == total - (VP - V) * 64


# ----------------------------------------------------------------------------------------------------------------
# initialisation


@pytest.fixture(scope="module")
def medium_model():
    torch.manual_seed(1234)
    return GPT(GPTConfig(block_size=256, vocab_size=1000, padded_vocab_size=1024, n_layer=4, n_head=4, n_embd=256))


def test_init_weight_statistics(medium_model):
    n_layer = medium_model.config.n_layer
    matrices = [(n, p) for n, p in medium_model.named_parameters() if p.dim() == 2]
    assert len(matrices) == 2 + 4 * n_layer  # wte (= lm_head), wpe, and c_attn, c_proj, c_fc, c_proj per block
    for name, p in matrices:
        expected = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
        w = p.detach().double().flatten()
        n = w.numel()
        # for n normal samples the sample std has standard error std/sqrt(2n), the mean std/sqrt(n): allow 5 of each
        assert abs(w.std().item() - expected) <= 5 * expected / math.sqrt(2 * n), name
        assert abs(w.mean().item()) <= 5 * expected / math.sqrt(n), name
        # normal, not merely the right spread: P(|x| < std) = 0.6827 (a uniform draw would give 0.577)
        inside = (w.abs() < expected).double().mean().item()
        assert abs(inside - 0.6827) <= 5 * math.sqrt(0.6827 * 0.3173 / n), name


def test_init_biases_and_layernorms(medium_model):
    vectors = [(n, p) for n, p in medium_model.named_parameters() if p.dim() == 1]
    assert vectors
    for name, p in vectors:
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.all(p == 1), name
        else:
            assert name.endswith(".bias"), name
            assert torch.all(p == 0), name


def test_vocab_mask_is_minus_infinity_on_padding_only(medium_model):
    logits, _ = medium_model(tokens((1, 8), seed=16, high=1000))
    assert torch.all(logits[..., 1000:] == float("-inf"))
    assert torch.isfinite(logits[..., :1000]).all()
    assert medium_model.state_dict().keys() == dict(medium_model.named_parameters(remove_duplicate=False)).keys()


# ----------------------------------------------------------------------------------------------------------------
# gradient accumulation


def test_gradient_accumulation_equals_one_large_batch():
    model = randomize_(tiny_model(), seed=18, std=0.05)
    idx, y = tokens((8, 32), seed=19), tokens((8, 32), seed=20)
    model(idx, y)[1].backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    steps = 4
    for i in range(steps):
        _, loss = model(idx[2 * i: 2 * i + 2], y[2 * i: 2 * i + 2])
        (loss / steps).backward()
    for n, p in model.named_parameters():
        assert full[n].abs().max() > 0, n
        assert torch.allclose(p.grad, full[n], rtol=1e-4, atol=1e-7), (n, (p.grad - full[n]).abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# generation


def rigged_model() -> GPT:
    """A model whose final hidden state is the same vector b everywhere, with the padded rows of the head aligned to
    b: without the vocabulary mask every sample would be a padding id."""
    model = tiny_model(n_layer=1)
    b = torch.randn(64, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        head = model.lm_head.weight
        head[:V] = 0.001 * torch.randn(V, 64, generator=torch.Generator().manual_seed(22))
        head[V:] = 10 * b / b.norm()
    return model.eval()


@pytest.mark.parametrize("top_k,temperature", [(None, 1.0), (50, 1.0), (VP + 10, 1.0), (None, 0.0), (None, 5.0)])
def test_generate_never_samples_padding_ids(top_k, temperature):
    model = rigged_model()
    raw = F.linear(model.transformer.ln_f.bias, model.lm_head.weight)
    assert raw[V:].min() > raw[:V].max() + 5  # the padding ids would win without the mask
    idx = tokens((4, 3), seed=23)
    gen = torch.Generator().manual_seed(24)
    out = model.generate(idx, 40, temperature=temperature, top_k=top_k, generator=gen)
    assert out.shape == (4, 43)
    assert torch.equal(out[:, :3], idx)
    assert out.max().item() < V and out.min().item() >= 0


def test_generate_is_deterministic_for_a_seeded_generator():
    model = randomize_(tiny_model(), seed=25, std=0.05).eval()
    idx = tokens((2, 5), seed=26)

    def sample(seed):
        return model.generate(idx, 24, top_k=None, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 5:], c[:, 5:])
    assert a.max().item() < V


def test_generate_top_k_one_is_greedy_and_crops_to_block_size():
    model = randomize_(tiny_model(block_size=16), seed=27).eval()
    idx = tokens((2, 20), seed=28)  # longer than block_size: only the last 16 tokens condition each step
    out = model.generate(idx, 6, top_k=1, generator=torch.Generator().manual_seed(0))
    expected = idx
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(expected[:, -16:])
            expected = torch.cat([expected, logits[:, -1, :V].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------------------------
# mixed precision (tiny tensors: this CPU has no native bf16)


def test_bf16_autocast_keeps_mask_and_computes_loss_in_fp32():
    model = tiny_model(n_layer=1, n_head=2, n_embd=32)
    idx, y = tokens((2, 8), seed=29), tokens((2, 8), seed=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, y)
    assert logits.dtype == torch.bfloat16
    assert torch.all(logits[..., V:] == float("-inf"))
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float().view(-1, VP), y.view(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    fp32_loss = model(idx, y)[1]
    assert loss.item() == pytest.approx(fp32_loss.item(), rel=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("preset,shape", [
    ("gpt2", (12, 12, 768)), ("gpt2-medium", (24, 16, 1024)), ("gpt2-large", (36, 20, 1280)),
    ("gpt2-xl", (48, 25, 1600)),  # as released by OpenAI
])
def test_released_gpt2_presets(preset, shape):
    c = model_config(preset)
    assert (c.n_layer, c.n_head, c.n_embd) == shape
    assert (c.block_size, c.vocab_size) == (1024, 50257)
    assert c.padded_vocab_size >= c.vocab_size and c.padded_vocab_size % 128 == 0
    assert c.padded_vocab_size - c.vocab_size < 128


@pytest.mark.parametrize("depth", [2, 4, 6, 8, 12])
def test_small_presets_follow_depth(depth):
    c = model_config(f"d{depth}")
    assert (c.n_layer, c.n_head, c.n_embd) == (depth, depth, 64 * depth)
    assert c.n_embd // c.n_head == 64


def test_every_preset_has_heads_of_64():
    assert len(PRESETS) == 9
    for name in PRESETS:
        c = model_config(name)
        assert c.n_embd % c.n_head == 0 and c.n_embd // c.n_head == 64, name


def test_overrides_apply_and_none_is_ignored():
    c = model_config("d6", n_layer=3, n_head=None, n_embd=None, block_size=128)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (3, 6, 384, 128)
    c = model_config("gpt2", n_head=8, n_embd=512)
    assert (c.n_layer, c.n_head, c.n_embd) == (12, 8, 512)
    assert model_config("gpt2-medium", n_layer=None) == model_config("gpt2-medium")
    assert model_config("gpt2") == GPTConfig()  # the dataclass defaults are GPT-2 small


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="gpt3") as e:
        model_config("gpt3")
    assert "gpt2-medium" in str(e.value)  # the message lists the choices


@pytest.mark.parametrize("preset,overrides", [("gpt2", dict(n_embd=100)), ("d4", dict(n_head=5)),
                                              ("gpt2-xl", dict(n_head=24))])
def test_width_not_divisible_by_heads_is_a_user_error(preset, overrides):
    with pytest.raises(UserError, match="divisible"):
        model_config(preset, **overrides)
