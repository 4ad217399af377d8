"""
Write a train_gpt2.py checkpoint as a Hugging Face model directory: GPT2LMHeadModel or LlamaForCausalLM where one of
those computes the model, otherwise the trainer's own model code for trust_remote_code=True.

  python export_hf.py out/ckpt_0019073.pt out/hf   # one checkpoint
  python export_hf.py out out/hf                   # the newest readable checkpoint of a run's --out_dir

It imports train_gpt2 (the model, the weight map, checkpoint reading); train_gpt2 never imports it.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import shutil
import sys
from dataclasses import asdict

import torch

import train_gpt2 as tg

# ----------------------------------------------------------------------------------------------------------------
# files: safetensors and the GPT-2 tokenizer, written without extra packages


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors format, written directly (it is an 8-byte little-endian header length, a JSON header of names,
    dtypes, shapes and byte ranges, then the raw bytes), so exporting needs no extra package. fp32 only."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n_bytes = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with tg.atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of Hugging Face's vocab.json and merges.txt: printable
    Latin-1 bytes stand for themselves, the other 68 for the characters from U+0100 on (space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer_files() -> dict[str, str]:
    """vocab.json and merges.txt for Hugging Face tokenizers, recovered from the bundled ranks. Every token above the
    256 bytes was made by one merge: running BPE on its bytes with only the merges ranked before it leaves exactly
    the two parts that merge was made of."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(tg.BPE_RANKS_PATH)
    chars = byte_to_char()
    show = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {rank} cannot be built from earlier merges: {tg.BPE_RANKS_PATH} is not a BPE")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{show(parts[0])} {show(parts[1])}")
    vocab = {show(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = tg.EOT_TOKEN
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}


# ----------------------------------------------------------------------------------------------------------------
# custom layout: the trainer's own model code, cut from train_gpt2.py at its section banners

HF_REMOTE_MODULE = "modeling_gpt2_trainer"  # the code file of a custom export
# The sections of train_gpt2.py a model needs, after its preamble: whole sections rather than a list of objects, so a
# helper added to any of them is exported with it.
HF_REMOTE_SECTIONS = ("config", "kernels", "model")
SECTION_BANNER = re.compile(r"# -+")  # a whole line; the comment line after it names the section
HF_REMOTE_IMPORTS = ("from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel\n"
                     "from transformers.modeling_outputs import CausalLMOutputWithPast\n")
# Its transformers side: a config that keeps our GPTConfig's fields whole, and a causal-LM wrapper around GPT.
HF_REMOTE_WRAPPER = """
class GPTTrainerConfig(PretrainedConfig):
    model_type = "gpt2_trainer"

    def __init__(self, gpt_config: dict | None = None, **kwargs):
        self.gpt_config = dict(gpt_config or {})
        self.num_hidden_layers = self.gpt_config.get("n_layer", 0)  # what generate() sizes its caches by
        kwargs.setdefault("use_cache", False)  # nothing to cache: each step reruns the window
        super().__init__(**kwargs)


class GPTTrainerForCausalLM(PreTrainedModel, GenerationMixin):
    \"\"\"GPT under transformers: logits over the real vocabulary (the padding ids cut off), HF's shifted-label loss.
    No KV cache: generation recomputes the last block_size tokens each step. attention_mask is ignored, which is
    exact for right padding (a causal model's real positions never see the pads), not for left padding.\"\"\"
    config_class = GPTTrainerConfig
    base_model_prefix = "gpt"
    _no_split_modules = ["Block"]

    def __init__(self, config: GPTTrainerConfig):
        super().__init__(config)
        self.gpt = GPT(GPTConfig(**config.gpt_config))
        self.post_init()

    def _init_weights(self, module):
        # from_pretrained loads every saved weight but leaves the tables that are not saved empty: compute them
        if isinstance(module, Rotary):
            half = module.cos.size(1)
            fresh = Rotary(2 * half, module.cos.size(0), self.gpt.config.rope_theta)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)
        elif isinstance(module, GPT):
            module.vocab_mask.zero_()
            module.vocab_mask[module.config.vocab_size:] = float("-inf")

    def get_input_embeddings(self):
        return self.gpt.transformer.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits, _ = self.gpt(input_ids[:, -self.gpt.config.block_size:])
        logits = logits[..., :self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
"""


def split_sections(source: str) -> tuple[str, dict[str, str]]:
    """(preamble, {name: text}) of a source cut at its banner lines: the preamble is everything before the first
    banner, each section runs from its banner (included) to the next one. A section's name is its title line's text
    up to a colon: '# kernels: the forms ...' is 'kernels'."""
    lines = source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if SECTION_BANNER.fullmatch(line.rstrip("\r\n"))]
    sections = {}
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        title = lines[start + 1] if start + 1 < len(lines) else ""
        if not title.startswith("# "):
            raise ValueError(f"the banner at line {start + 1} has no '# name' line after it")
        name = title[2:].split(":")[0].strip()
        if name in sections:  # two sections of one name: which one a caller meant is unknowable
            raise ValueError(f"two sections are named '{name}' (the second at line {start + 1})")
        sections[name] = "".join(lines[start:end])
    return "".join(lines[:starts[0] if starts else len(lines)]), sections


def without_docstring(code: str) -> str:
    """`code` less its leading docstring: the modeling file has a docstring of its own, and `from __future__`
    imports must come before anything but a docstring."""
    body = ast.parse(code).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        code = "".join(code.splitlines(keepends=True)[body[0].end_lineno:])
    return code.lstrip("\n")


def trainer_sections(names: tuple[str, ...] | list[str]) -> str:
    """train_gpt2.py's preamble (without its docstring: imports, constants, small helpers) followed by the sections
    `names`, verbatim and in that order, banners included."""
    with open(tg.__file__, encoding="utf-8") as f:
        preamble, sections = split_sections(f.read())
    missing = [name for name in names if name not in sections]
    if missing:
        raise ValueError(f"{tg.__file__} has no section {', '.join(map(repr, missing))} "
                         f"(its sections: {', '.join(sections)})")
    return without_docstring(preamble).rstrip("\n") + "\n\n\n" + "".join(sections[name] for name in names)


def hf_remote_code() -> str:
    """modeling_gpt2_trainer.py of a custom export: train_gpt2.py's preamble and config, kernels and model sections,
    verbatim (so the export computes what we compute and needs nothing of this repository), then the wrapper."""
    header = ('"""GPT from gpt2-trainer\'s train_gpt2.py (its preamble and its config, kernels and model sections,\n'
              'verbatim) as a transformers model, loaded with trust_remote_code=True. GPT.from_pretrained\n'
              'belongs to the trainer and does not work here."""\n\n')
    return (header + trainer_sections(HF_REMOTE_SECTIONS).rstrip("\n") + "\n\n\n" + HF_REMOTE_IMPORTS + "\n"
            + HF_REMOTE_WRAPPER)


# ----------------------------------------------------------------------------------------------------------------
# export: config.json for each layout, then the directory


def hf_config(config: tg.GPTConfig) -> dict:
    """config.json for the Hugging Face layout of `config` (see hf_layout)."""
    common = {"vocab_size": config.vocab_size, "bos_token_id": tg.EOT_TOKEN, "eos_token_id": tg.EOT_TOKEN,
              "tie_word_embeddings": config.tie_embeddings}
    if tg.hf_layout(config) == "custom":
        auto = {"AutoConfig": f"{HF_REMOTE_MODULE}.GPTTrainerConfig",
                "AutoModelForCausalLM": f"{HF_REMOTE_MODULE}.GPTTrainerForCausalLM"}
        return {"architectures": ["GPTTrainerForCausalLM"], "model_type": "gpt2_trainer", "auto_map": auto,
                "gpt_config": asdict(config), "max_position_embeddings": config.block_size, "use_cache": False,
                **common}
    if tg.hf_layout(config) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": config.block_size,
                "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": config.mlp_hidden, "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.n_embd,
            "intermediate_size": config.mlp_hidden, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
            "head_dim": config.head_dim, "max_position_embeddings": config.block_size, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": config.rope_theta, "rope_parameters": rope, "rope_scaling": None,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, **common}


def check_out_dir(out_dir: str) -> None:
    """Refuse a directory that holds anything (or a file in the way): an export never overwrites."""
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise tg.UserError(f"export directory '{out_dir}' already exists and is not an empty directory; "
                           "choose a new one")


def export_hf(model: tg.GPT, out_dir: str) -> str:
    """Write `model` as a Hugging Face model directory (safetensors weights, config.json, GPT-2 tokenizer files) with
    the vocabulary cut back to its real size; returns the layout. The directory appears complete or not at all."""
    layout = tg.hf_layout(model.config)
    check_out_dir(out_dir)
    sd = model.state_dict()
    if layout == "custom":  # our own names under the wrapper's `gpt`; a tied matrix under both of its names
        tensors = {f"gpt.{name}": t for name, t in sd.items()}
    else:
        tensors = {}
        for hf_name, name, rows, transposed in tg.hf_weight_map(model.config):
            w = sd[name] if rows is None else sd[name][rows]
            tensors[hf_name] = w.t() if transposed else w
    eot = tg.EOT_TOKEN
    files = {
        "config.json": json.dumps(hf_config(model.config), indent=2),
        **({f"{HF_REMOTE_MODULE}.py": hf_remote_code()} if layout == "custom" else {}),
        "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eot}),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "add_prefix_space": False}, indent=2),
        "special_tokens_map.json": json.dumps(
            {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
        **gpt2_tokenizer_files(),
    }
    tmp = f"{os.path.normpath(out_dir)}.tmp{os.getpid()}"
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
        for name, text in files.items():
            with tg.atomic_write(os.path.join(tmp, name), "w") as f:
                f.write(text)
        os.replace(tmp, out_dir)  # a rename: replaces nothing but an empty directory
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return layout


# ----------------------------------------------------------------------------------------------------------------
# CLI


def read_checkpoint(path: str) -> tuple[str, dict]:
    """The checkpoint file `path`, or the newest readable one of a run's out_dir (as `--resume auto` picks it), and
    its contents."""
    if os.path.isdir(path):
        if not tg.list_checkpoints(path):
            raise tg.UserError(f"no checkpoint (ckpt_*.pt) in '{path}'; pass a checkpoint file, or the out_dir of a "
                               "run that has saved one")
        found, ckpt = tg.find_resume_checkpoint(path, "auto")
    elif not os.path.exists(path):
        raise tg.UserError(f"checkpoint '{path}' does not exist; pass a ckpt_*.pt file or a run's out_dir")
    else:
        found, ckpt = path, tg.load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise tg.UserError(f"'{found}' is not a train_gpt2.py checkpoint (it holds no model and config)")
    return found, ckpt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write a train_gpt2.py checkpoint as a Hugging Face model directory: GPT2LMHeadModel or "
                    "LlamaForCausalLM where one computes the model, otherwise with the trainer's own model code "
                    "(load it with trust_remote_code=True).")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a ckpt_*.pt file, or a run's --out_dir (then its newest readable checkpoint)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="the directory to write; it must not exist or must be empty (it is never overwritten)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_out_dir(args.out_dir)  # before reading a checkpoint that may be gigabytes
        path, ckpt = read_checkpoint(args.checkpoint)
        layout = export_hf(tg.model_from_checkpoint(ckpt), args.out_dir)
    except tg.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {path} as a Hugging Face {layout} model to {args.out_dir}")


if __name__ == "__main__":
    main()
