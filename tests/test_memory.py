"""
Checks for benchmarks/memory_table.py: its parameter counts equal those of real models (and of every preset, built
on the meta device), and its saved-activation formula, whose constants were fitted on other configurations, predicts
the bytes autograd actually saves in a bf16-autocast forward of a configuration the fit never saw, with and without
activation checkpointing and the chunked loss. Models are tiny; the measurement is one forward each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import pytest
import torch

import memory_table as mt
import train_gpt2 as t

# The formula is exact to the byte on the pinned torch; 2% leaves room for a release that saves one more small tensor
# (a statistic, an RNG seed) without hiding a missed activation, which would cost far more than that.
TOLERANCE = 0.02

# other width, head size, depth, vocabulary, batch and length than any fitting run
HELD_OUT = t.GPTConfig(n_layer=2, n_embd=96, n_head=4, vocab_size=380, padded_vocab_size=384, block_size=64)
B, T = 3, 40


@pytest.mark.parametrize("overrides", [{}, dict(n_layer=3, n_embd=48, n_head=3), dict(bias=False),
                                       dict(tie_embeddings=False), dict(mlp_hidden=100)],
                         ids=["tiny", "deeper", "no-bias", "untied", "mlp_hidden"])
def test_param_counts_match_a_real_model(overrides):
    config = t.GPTConfig(**{**dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300, padded_vocab_size=320,
                                   block_size=32), **overrides})
    model = t.GPT(config)
    n = mt.param_counts(config)
    assert n.total == sum(p.numel() for p in model.parameters())
    assert n.gpt2 == model.num_params()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert n.matrix == sum(m.weight.numel() for m in linears)
    block = model.transformer.h[0]
    assert n.block == sum(p.numel() for p in block.parameters())
    assert n.block_matrix == sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))


def test_param_counts_match_every_preset():
    for name in t.PRESETS:
        config = t.model_config(name)
        with torch.device("meta"):  # gpt2-xl without allocating 6 GB
            model = t.GPT(config)
        n = mt.param_counts(config)
        assert n.total == sum(p.numel() for p in model.parameters()), name
        assert n.gpt2 == model.num_params(), name
    assert mt.param_counts(t.model_config("gpt2")).gpt2 == 124_439_808  # GPT-2 small as released


def test_held_out_config_was_not_fitted():
    # not merely a different combination: no fitting run shares its width, head size, vocabulary or length
    for config, _, seq_len, _, _ in mt.FIT_RUNS:
        assert config.n_embd != HELD_OUT.n_embd and config.head_dim != HELD_OUT.head_dim
        assert config.padded_vocab_size != HELD_OUT.padded_vocab_size and seq_len != T


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "AC"])
@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked"])
def test_saved_activation_formula_matches_measurement(checkpointing, chunked):
    measured, copies = mt.measure_saved(HELD_OUT, B, T, checkpointing, chunked)
    predicted = mt.saved_bytes(HELD_OUT, B, T, checkpointing, chunked)
    assert measured == pytest.approx(predicted, rel=TOLERANCE)
    assert copies == pytest.approx(mt.saved_copy_bytes(HELD_OUT, checkpointing, chunked), rel=TOLERANCE)


def test_checkpointing_keeps_one_fp32_residual_per_block():
    # the difference between depths L+1 and L is what one more block costs
    deeper = dataclasses.replace(HELD_OUT, n_layer=HELD_OUT.n_layer + 1)
    plain = mt.measure_saved(deeper, B, T, False, True)[0] - mt.measure_saved(HELD_OUT, B, T, False, True)[0]
    ckpt = mt.measure_saved(deeper, B, T, True, True)[0] - mt.measure_saved(HELD_OUT, B, T, True, True)[0]
    assert ckpt == 4 * B * T * HELD_OUT.n_embd
    assert plain > 8 * ckpt  # what checkpointing is for


def test_fsdp_shards_state_but_not_activations():
    config = t.model_config("gpt2-large")
    ddp = mt.per_gpu(config, 8, 1024, False, True, "ddp")
    fsdp = mt.per_gpu(config, 8, 1024, False, True, "fsdp", world_size=8)
    assert fsdp.state == pytest.approx(ddp.state / 8)
    assert fsdp.activations == ddp.activations
    assert ddp.extra == 4 * mt.param_counts(config).total


def test_table_lists_the_presets_with_a_card_each():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mt.main([])
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(mt.TABLE_PRESETS)
    for row in rows:
        assert row.count("→") + row.count("✗") == 4
    assert "GiB" in out.getvalue() and "10% headroom" in out.getvalue()
