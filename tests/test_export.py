"""
export_hf.py: a trained model leaves this project as a Hugging Face directory (GPT-2 or Llama layout, or our own
model code for the mixes neither computes, with the GPT-2 tokenizer), which transformers loads offline to the same
logits and greedy generations; GPT.from_pretrained reads it back; the export command line, and HellaSwag scoring of
the checkpoint and of its export alike; bad input in one line, and nothing left behind.

Every check compares against a computation made independently (Hugging Face's own implementation, tiktoken, the
safetensors package). Models are tiny and fp32.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import json
import os
import re
import subprocess
import symtable
import sys
from dataclasses import asdict

import pytest
import torch

import export_hf as ex
import hellaswag_eval as H
import train_gpt2 as tg
from conftest import (
    GPT2_V,
    HELLASWAG_SAMPLE,
    LLAMA_STYLE,
    ROOT,
    assert_one_line_error,
    cli,
    is_vector,
    ok,
    quiet_transformers,
    randomize_,
    small_gpt2,
    tiny_config,
    tokens,
)

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after

EXPORT_SCRIPT = os.path.join(ROOT, "export_hf.py")
SAMPLE = HELLASWAG_SAMPLE
CORPUS = os.path.join(ROOT, "data", "gutenberg_sample.parquet")

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
    model = randomize_(small_gpt2(norm="rmsnorm", pos="rope", mlp="relu2", bias=False, qk_norm=True, embed_norm=True,
                                  x0_lambdas=True, logit_softcap=15.0, tie_embeddings=tied),
                       std=0.1, seed=1, around_one=is_vector)
    assert tg.hf_layout(model.config) == "custom"
    directory = tmp_path / "hf"
    assert ex.export_hf(model, str(directory)) == "custom"
    code = (directory / f"{ex.HF_REMOTE_MODULE}.py").read_text()
    assert "train_gpt2" not in code.replace("train_gpt2.py", "")  # named in the docstring, never imported
    idx, prompt = tokens((2, 40), seed=3, high=GPT2_V), tokens((1, 6), seed=4, high=GPT2_V)
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
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for name, (ckpt, out_dir) in jobs.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


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
            r[source] = cli([*arg, "--data_file", SAMPLE, "--device", "cpu", "--dtype", "fp32",
                                       "--batch_size", "4", "--no_progress", "--out", out], main=H.main)
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
    rc, stdout, stderr = run.returncode, run.stdout, run.stderr
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
    model = tg.GPT(tiny_config())
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


def save_tiny_checkpoint(path, seed: int) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=300, padded_vocab_size=320, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 1}, path)
    return model


@pytest.mark.parametrize("case, fragments", [
    ("missing_checkpoint", ["missing.pt", "does not exist"]),
    ("run_without_checkpoints", ["no checkpoint", "checkpoint file"]),
    ("occupied_out_dir", ["occupied", "already exists"]),
])
def test_export_without_what_it_needs(tmp_path, case, fragments):
    """export_hf.py's bad input: one error line, exit 2, nothing written (the occupied directory left as it was)."""
    run, occupied = tmp_path / "run", tmp_path / "occupied"
    run.mkdir()
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    save_tiny_checkpoint(run / "ckpt_0000001.pt", seed=0)
    argv = {"missing_checkpoint": [tmp_path / "missing.pt", tmp_path / "export"],
            "run_without_checkpoints": [occupied, tmp_path / "export"],
            "occupied_out_dir": [run / "ckpt_0000001.pt", occupied]}[case]
    assert_one_line_error(cli(argv, main=ex.main), *fragments)
    assert sorted(os.listdir(tmp_path)) == ["occupied", "run"]
    assert os.listdir(occupied) == ["keep.txt"] and os.listdir(run) == ["ckpt_0000001.pt"]


def test_export_of_a_run_takes_its_newest_readable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "gpt2_tokenizer_files", lambda: {})  # checkpoint choice only: no tokenizer needed
    run = tmp_path / "run"
    run.mkdir()
    save_tiny_checkpoint(run / "ckpt_0000001.pt", seed=1)
    model = save_tiny_checkpoint(run / "ckpt_0000002.pt", seed=2)
    (run / "ckpt_0000003.pt").write_bytes(b"cut short")
    r = ok(cli([run, tmp_path / "hf"], main=ex.main))
    assert "ckpt_0000003.pt" in r.stdout and "warning" in r.stdout
    assert f"exported {run / 'ckpt_0000002.pt'} as a Hugging Face gpt2 model to {tmp_path / 'hf'}" in r.stdout
    safetensors_torch = pytest.importorskip("safetensors.torch")
    exported = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(exported["transformer.wpe.weight"], model.transformer.wpe.weight)
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]
