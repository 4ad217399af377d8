"""The speedrun options and --recipe speedrun: each architecture piece against a computation written out here, the
Muon/NorMuon step against its formulas, the WSD schedule, BOS-aligned and shuffled loading, and the recipe end to
end (explicit flags win, exact resume, DDP ranks identical, an old checkpoint still resumes)."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export_hf as ex
import gpt2_tokens
import train_gpt2 as tg
from test_options import assert_one_line_error, ckpt, cli, kept_global_state, ok, optimizer_tensors, read_log
from test_train import TINY, make_shards

EOT = tg.EOT_TOKEN


@pytest.fixture(autouse=True)
def global_state():
    with kept_global_state():
        yield


def small(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tg.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, **overrides)
    return tg.GPT(config).eval()


def randomize(model, std=0.2, seed=1):
    """Weights well away from init, so that every piece of the model matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return model


def tokens(shape, seed=0):
    return torch.randint(0, tg.GPT2_VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# architecture pieces


def test_logit_softcap_loss_matches_float64_and_chunked_equals_plain():
    model = randomize(small(logit_softcap=5.0, tie_embeddings=False), std=0.3)
    idx, targets = tokens((3, 40)), tokens((3, 40), seed=1)
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
        model = randomize(small(qk_norm=qk_norm))
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
    model = randomize(small(qk_norm=True, bias=False))
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
    model = randomize(small(mlp="relu2"))
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (256, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5)).double()
    h = x @ mlp.c_fc.weight.double().T + mlp.c_fc.bias.double()
    ref = torch.clamp(h, min=0) ** 2 @ mlp.c_proj.weight.double().T + mlp.c_proj.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x.float()).double(), ref, rtol=1e-4, atol=1e-4)


def test_x0_lambdas_and_embed_norm_mix_the_embedding_into_every_block():
    model = randomize(small(x0_lambdas=True, embed_norm=True, norm="rmsnorm", pos="rope", bias=False))
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([0.7, 1.3]))
        model.x0_lambdas.copy_(torch.tensor([0.4, -0.2]))
    idx = tokens((2, 12))
    t = model.transformer
    with torch.no_grad():
        x0 = t.ln_e(t.wte(idx))
        x = x0
        for i, block in enumerate(t.h):
            x = block(model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0, model.rotary(0, 12))
        ref = F.linear(t.ln_f(x), model.lm_head.weight, model.vocab_mask)
        torch.testing.assert_close(model(idx)[0], ref, rtol=0, atol=0)


def test_zero_init_starts_every_block_as_the_identity_and_the_head_uniform():
    model = small(zero_init=True, tie_embeddings=False, x0_lambdas=True, mlp="relu2", qk_norm=True)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert p.abs().max() == 0, name
        elif name.endswith("c_attn.weight"):
            assert p.std().item() == pytest.approx(0.02, rel=0.1)
    idx, targets = tokens((2, 20)), tokens((2, 20), seed=1)
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


LOAD_EXPORT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
directory, inputs, out = sys.argv[1:]
assert not any("train_gpt2" in name for name in sys.modules)
hf, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
hf = hf.float().eval()
idx, prompt = torch.load(inputs)
with torch.no_grad():
    logits = hf(idx).logits
greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256)
torch.save({"logits": logits, "greedy": greedy, "class": type(hf).__name__,
            "problems": [k for k, v in info.items() if v]}, out)
"""


@pytest.mark.parametrize("tied", [False, True], ids=["recipe-untied", "tied"])
def test_speedrun_models_export_with_their_own_modeling_code(tmp_path, tied):
    """Every speedrun option (and a softcap) in a model no Hugging Face layout computes: the export ships our model
    code, and a fresh interpreter that cannot import this repository loads it offline with trust_remote_code; its
    logits equal ours (fp32, 1e-4) and its greedy generate() continues a prompt with our sampler's tokens."""
    pytest.importorskip("transformers")
    model = randomize(small(norm="rmsnorm", pos="rope", mlp="relu2", bias=False, qk_norm=True, embed_norm=True,
                            x0_lambdas=True, logit_softcap=15.0, tie_embeddings=tied), std=0.1)
    assert tg.hf_layout(model.config) == "custom"
    directory = tmp_path / "hf"
    assert ex.export_hf(model, str(directory)) == "custom"
    code = (directory / f"{ex.HF_REMOTE_MODULE}.py").read_text()
    assert "train_gpt2" not in code.replace("train_gpt2.py", "")  # named in the docstring, never imported
    idx, prompt = tokens((2, 40), seed=3), tokens((1, 6), seed=4)
    torch.save((idx, prompt), tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(LOAD_EXPORT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    subprocess.run([sys.executable, "load.py", str(directory), "inputs.pt", "out.pt"], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "GPTTrainerForCausalLM" and out["problems"] == []
    with torch.no_grad():
        ours, _ = model(idx)
    assert out["logits"].shape == (2, 40, tg.GPT2_VOCAB_SIZE)
    assert (out["logits"] - ours[..., :tg.GPT2_VOCAB_SIZE]).abs().max().item() <= 1e-4
    assert out["logits"].std().item() > 0.5
    assert torch.equal(out["greedy"], model.generate(prompt, 12, top_k=1))


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
    model = small(norm="rmsnorm", bias=False)
    settings = tg.parse_settings(["--optimizer", "muon"])
    for dtype in (torch.float32, torch.bfloat16):
        muon, _ = tg.configure_optimizers(model, settings, "cpu", ortho_dtype=dtype)
        model(tokens((1, 8)), tokens((1, 8), seed=1))[1].backward()
        muon.step()
        assert set(seen) == {dtype}
        seen.clear()


def test_adam_groups_take_their_own_learning_rates():
    model = small(tie_embeddings=False, x0_lambdas=True)
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
# schedules


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
# BOS-aligned and shuffled loading


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


def test_bos_aligned_rows_start_at_documents_or_continue_long_ones(tmp_path):
    T = 16
    lengths = np.random.default_rng(1).integers(3, 45, 120)
    stream = document_shards(str(tmp_path), lengths)
    starts = np.flatnonzero(stream == EOT)
    loader = tg.ShardLoader(str(tmp_path), "train", 4, T, bos_aligned=True)
    rows = loader.rows
    # by the definition, found here by walking the documents
    want, pos = [], 0
    ends = dict(zip(starts, np.append(starts[1:], len(stream))))
    allowed = sorted({s + k * T for s in starts for k in range(-(-(ends[s] - s) // T))})
    while True:
        nxt = [a for a in allowed if a >= pos]
        if not nxt or nxt[0] + T + 1 > len(stream):
            break
        want.append(nxt[0])
        pos = nxt[0] + T
    assert rows.tolist() == want
    assert all(stream[r] == EOT or (r - starts[starts <= r][-1]) % T == 0 for r in rows)
    assert loader.skipped_tokens() == len(stream) - 1 - T * len(rows) > 0


@pytest.mark.parametrize("bos_aligned", [True, False])
def test_shuffled_rows_are_read_once_per_epoch_by_one_rank_in_a_seeded_order(tmp_path, bos_aligned):
    T, B, W = 8, 3, 2
    stream = document_shards(str(tmp_path), np.random.default_rng(2).integers(3, 30, 150))
    loaders = [tg.ShardLoader(str(tmp_path), "train", B, T, r, W, bos_aligned=bos_aligned, shuffle=True, seed=5)
               for r in range(W)]
    rows = loaders[0].rows
    index = {tuple(stream[s:s + 2]): i for i, s in enumerate(rows)}  # body tokens are unique: 2 name a row
    assert len(index) == len(rows)
    per_epoch = len(rows) // (B * W)
    epochs = []
    for epoch in range(2):
        seen = []
        for _ in range(per_epoch):
            for loader in loaders:
                x, y = loader.next_batch()
                for row_x, row_y in zip(x.numpy(), y.numpy()):
                    i = index[tuple(row_x[:2])]
                    assert np.array_equal(row_x, stream[rows[i]:rows[i] + T])
                    assert np.array_equal(row_y, stream[rows[i] + 1:rows[i] + T + 1])
                    seen.append(i)
        assert len(seen) == len(set(seen)) == per_epoch * B * W  # each row once, never by two ranks
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])
    again = tg.ShardLoader(str(tmp_path), "train", B, T, 0, W, bos_aligned=bos_aligned, shuffle=True, seed=5)
    again.load_state_dict(loaders[0].state_dict())
    for loader in (loaders[0], again):
        loader.epoch, loader.position = 1, 2 * B * W
    assert torch.equal(again.next_batch()[0], loaders[0].next_batch()[0])


def test_bos_aligned_without_documents_is_one_line(tmp_path):
    make_shards(str(tmp_path), vocab=1000)
    r = cli(TINY + ["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--bos_aligned"])
    assert_one_line_error(r, "--bos_aligned", "<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------------
# the recipe end to end


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("docs"))
    document_shards(folder, np.random.default_rng(3).integers(5, 90, 260), val=3000)
    return folder


def test_recipe_fills_in_what_the_command_line_leaves_out():
    a = tg.parse_settings(["--model", "d4", "--recipe", "speedrun", "--muon_lr", "0.05", "--no-shuffle"])
    recipe = tg.RECIPES["speedrun"]["flags"]
    assert a.muon_lr == 0.05 and a.shuffle is False
    assert a.embed_lr == pytest.approx(recipe["embed_lr"] * math.sqrt(768 / 256))
    assert (a.optimizer, a.mlp, a.qk_norm, a.lr_schedule, a.untie) == ("normuon", "relu2", True, "wsd", True)
    plain = tg.parse_settings(["--model", "d4"])
    assert (plain.optimizer, plain.mlp, plain.qk_norm, plain.lr_schedule) == ("adamw", None, None, "cosine")


def test_recipe_resumes_bit_identical_and_keeps_its_recipe(docs, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = TINY + ["--data_dir", docs, "--max_steps", 5]
    r = ok(cli(common + ["--out_dir", whole, "--recipe", "speedrun", "--head_lr", "0.02"]))
    assert "recipe speedrun: --norm rmsnorm" in r.stdout and "given on the command line: --head_lr" in r.stdout
    assert "--warmup_steps 1 --muon_momentum_warmup 2" in r.stdout and "starting at document starts" in r.stdout
    # no parameter trains at --lr under the recipe: the step line gives the schedule's multiplier of every peak LR
    assert re.search(r"^step +1/5 \| loss [\d.]+ \| lr x1\.000 \|", r.stdout, re.M), r.stdout
    assert all("lr" not in rec and 0 < rec["lr_scale"] <= 1 for rec in read_log(whole) if "train_loss" in rec)
    ok(cli(common + ["--out_dir", split, "--recipe", "speedrun", "--head_lr", "0.02", "--stop_at_step", 2]))
    r = ok(cli(common + ["--out_dir", split, "--head_lr", "0.02", "--resume", "auto"]))  # no --recipe: kept
    assert "resumed from" in r.stdout and "recipe speedrun" in r.stdout
    a, b = ckpt(whole, 5), ckpt(split, 5)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"])
    assert sa.keys() == sb.keys() and any(k[2] == "second_moment" for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r.get("train_loss") for r in read_log(whole)] == [r.get("train_loss") for r in read_log(split)]
    assert a["config"]["qk_norm"] and a["settings"]["recipe"] == "speedrun" and a["settings"]["head_lr"] == 0.02


def test_a_checkpoint_from_before_the_speedrun_options_resumes(data_dir_plain, tmp_path):
    out = str(tmp_path / "old")
    common = TINY + ["--data_dir", data_dir_plain, "--max_steps", 3, "--out_dir", out]
    ok(cli(common + ["--stop_at_step", 1]))
    path = os.path.join(out, "ckpt_0000001.pt")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("qk_norm", "embed_norm", "x0_lambdas", "zero_init", "logit_softcap"):
        del saved["config"][key]
    saved["args"] = saved.pop("settings")  # as older checkpoints name them
    for key in ("recipe", "bos_aligned", "shuffle", "lr_schedule", "explicit"):
        del saved["args"][key]
    torch.save(saved, path)
    r = ok(cli(common + ["--resume", "auto"]))
    assert "resumed from" in r.stdout and ckpt(out, 3)["step"] == 3


@pytest.fixture(scope="module")
def data_dir_plain(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("plain"))
    make_shards(folder, train_sizes=(6000, 5000), val_size=3000)
    return folder


@pytest.mark.parametrize("flags, fragments", [
    (["--lr_schedule", "wsd", "--cooldown_frac", "0"], ["--cooldown_frac"]),
    (["--logit_softcap", "-1"], ["--logit_softcap"]),
])
def test_bad_recipe_flags_are_one_line(data_dir_plain, tmp_path, flags, fragments):
    r = cli(TINY + ["--data_dir", data_dir_plain, "--out_dir", str(tmp_path / "out")] + flags)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "out").exists()


def test_resuming_with_another_data_order_is_refused(docs, tmp_path):
    out = str(tmp_path / "run")
    ok(cli(TINY + ["--data_dir", docs, "--max_steps", 2, "--out_dir", out, "--shuffle"]))
    r = cli(TINY + ["--data_dir", docs, "--max_steps", 3, "--out_dir", out, "--resume", "auto"])
    assert_one_line_error(r, "--shuffle")


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train_gpt2 as tg
dist.init_process_group("gloo")
rank = dist.get_rank()
settings = tg.parse_settings(["--model", "d2", "--recipe", "speedrun"])
config, _ = tg.model_from_settings(settings)
torch.manual_seed(0)
model = tg.GPT(config)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opts = tg.configure_optimizers(model, settings, "cpu", ortho_dtype=torch.float32)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training
for step in range(3):
    idx = torch.randint(0, 50257, (2, 33), generator=g)
    ddp(idx[:, :-1], idx[:, 1:])[1].backward()
    for o in opts:
        o.step()
        o.zero_grad()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
both = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
torch.manual_seed(0)
moved = (flat - torch.cat([p.flatten() for p in tg.GPT(config).parameters()])).abs().max().item()
if rank == 0:
    print("identical" if torch.equal(both[0], both[1]) else "different", moved)
dist.destroy_process_group()
"""


def test_ddp_ranks_end_normuon_steps_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_normuon.py"
    script.write_text(DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), root], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    verdict, moved = r.stdout.split()[-2:]
    assert verdict == "identical" and float(moved) > 1e-3


def test_fsdp_with_normuon_is_refused(data_dir_plain, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli(TINY + ["--data_dir", data_dir_plain, "--out_dir", str(tmp_path / "out"), "--fsdp", "--optimizer",
                    "normuon"])
    assert_one_line_error(r, "--optimizer normuon", "--fsdp")
