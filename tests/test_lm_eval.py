"""lm-evaluation-harness against hellaswag_eval.py: a model exported with `export_hf.py` is scored by
lm-eval (its Python API and its command line, offline, on local tasks built from the bundled HellaSwag examples)
and by hellaswag_eval.py from the training checkpoint. The two share no scoring code, no model code and no
tokenizer code; they must agree on every ending's log-likelihood, hence on acc (lm-eval's acc) and
acc_norm_chars (lm-eval's acc_norm), with the text as hellaswag_eval.py reads it and with lm-eval's hellaswag
preprocessing (lm-eval's own process_docs on its side, --text lm_eval on ours)."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict

import pytest
import torch

import hellaswag_eval as H
import train_gpt2 as tg
from conftest import HELLASWAG_SAMPLE, ROOT, randomize_, tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements-test.txt)")

BUNDLED = HELLASWAG_SAMPLE
EXPORT_SCRIPT = os.path.join(ROOT, "export_hf.py")
LM_EVAL_DOC = os.path.join(ROOT, "docs", "evaluation.md")  # gives the task files and the `lm_eval run` command
FP32 = torch.float32

# The local tasks, as docs/evaluation.md gives them (with its data file path in its place).
# hellaswag_local: ctx and endings exactly as in the file, as hellaswag_eval.py scores them by default.
TASK_YAML = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data_file}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: endings
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# hellaswag_local_lm_eval_text: lm-eval's own hellaswag task (its process_docs, query and choices) on the file;
# !function finds a module next to the YAML (lm-eval before 0.4.12 looks nowhere else)
TASK_YAML_LM_EVAL_TEXT = """\
include: hellaswag_local.yaml
task: hellaswag_local_lm_eval_text
process_docs: !function hellaswag_local_utils.process_docs
doc_to_text: "{{query}}"
doc_to_choice: choices
"""
TASK_UTILS = "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
TASK_FILES = {"hellaswag_local.yaml": TASK_YAML, "hellaswag_local_lm_eval_text.yaml": TASK_YAML_LM_EVAL_TEXT,
              "hellaswag_local_utils.py": TASK_UTILS}
TASKS = {"hellaswag_local": "raw", "hellaswag_local_lm_eval_text": "lm_eval"}  # task -> hellaswag_eval's --text
DOC_DATA_FILE = "/absolute/path/to/hellaswag_val.jsonl"


def model_args(model_dir, custom=False) -> str:
    """The hf backend's arguments; an export with its own model code needs trust_remote_code, as the docs say."""
    return f"pretrained={model_dir},dtype=float32" + (",trust_remote_code=True" if custom else "")


def cli_args(model_dir, task_dir, out_dir, custom=False) -> list[str]:
    """`lm_eval run`'s arguments: the documented command, and the command line equivalent of SIMPLE_EVALUATE."""
    return ["run", "--model", "hf", "--model_args", model_args(model_dir, custom), "--include_path",
            str(task_dir), "--tasks", "hellaswag_local", "--device", "cpu", "--batch_size", "8",
            "--output_path", str(out_dir)]


# lm_eval.simple_evaluate in a fresh process: the offline switches are read when huggingface_hub and datasets are
# first imported, which in this process may already have happened
SIMPLE_EVALUATE = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

model_dir, task_dir, out, model_args = sys.argv[1:5]
tasks = json.loads(sys.argv[5])
# the command line's TaskManager also indexes lm-eval's ~15,000 built-in tasks (seconds); the result is the same
manager = TaskManager(include_path=task_dir, include_defaults=False)
r = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks,
                           task_manager=manager, batch_size=8, device="cpu", log_samples=True, bootstrap_iters=0)
saved = {}
for task in tasks:
    samples = sorted(r["samples"][task], key=lambda s: s["doc_id"])
    saved[task] = {"acc": r["results"][task]["acc,none"], "acc_norm": r["results"][task]["acc_norm,none"],
                   "n": len(samples), "target": [s["target"] for s in samples],
                   "arguments": [[list(a) for a in s["arguments"]] for s in samples],
                   "loglikelihood": [[ll for ll, _ in s["filtered_resps"]] for s in samples]}
with open(out, "w") as f:
    json.dump(saved, f)
"""


def offline_env(home) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_EVALUATE_OFFLINE": "1", "HF_HOME": str(home), "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def run_all(commands, env, cwd, timeout=600):
    """Run the commands at once (each mostly waits on Python, one core apiece); every one must exit 0."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
             for argv, log in zip(commands, logs)]
    for argv, p, log in zip(commands, procs, logs):
        p.wait(timeout=timeout)
        log.seek(0)
        output = log.read()
        log.close()
        assert p.returncode == 0, f"{argv[:4]} exited {p.returncode}:\n{output[-4000:]}"


def lm_eval_model(seed=60, block_size=128, **overrides):
    """A 2-layer GPT-2 with the full vocabulary and spread-out weights, so that endings get clearly different
    scores; block_size 128 holds every example whole (lm-eval and we cut over-long inputs differently)."""
    model = tiny_model(seed, gpt2_vocab=True, block_size=block_size, **overrides)
    gains = lambda name, p: p.dim() == 1 and not name.endswith("bias")  # noqa: E731
    return randomize_(model, seed=seed + 100, std=0.1, around_one=gains).eval()


def relabelled(path) -> str:
    """The bundled examples, every other one labelled with its shortest ending (a string label where the bundled
    one is a string). A random model's summed loss picks the shortest ending, which is never the bundled label:
    with those labels acc would be 0 on both sides and agree without saying much."""
    with open(BUNDLED) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(path, "w") as f:
        for i, r in enumerate(records):
            if i % 2 == 0:
                shortest = min(range(4), key=lambda k: len(r["endings"][k]))
                r = dict(r, label=str(shortest) if isinstance(r["label"], str) else shortest)
            f.write(json.dumps(r) + "\n")
    return str(path)


# both kinds of export: a GPT-2 layout, and the speedrun options, which ship their own model code
KINDS = {"gpt2": {}, "speedrun": dict(norm="rmsnorm", pos="rope", mlp="relu2", bias=False, qk_norm=True,
                                      embed_norm=True, x0_lambdas=True, logit_softcap=15.0, tie_embeddings=False)}


@pytest.fixture(scope="module", params=list(KINDS))
def runs(tmp_path_factory, request):
    """A checkpoint, its export by export_hf.py's command line, and lm-eval's results on it from
    simple_evaluate and from the `lm_eval run` command line."""
    root = tmp_path_factory.mktemp("lm_eval")
    data_file = relabelled(root / "hellaswag_sample.jsonl")
    env = offline_env(root / "hf_home")
    model = lm_eval_model(**KINDS[request.param])
    custom = request.param != "gpt2"
    ckpt = str(root / "tiny.pt")
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 1}, ckpt)
    export = str(root / "hf")
    run_all([[sys.executable, EXPORT_SCRIPT, ckpt, export]], env, ROOT)

    task_dir = root / "tasks"
    task_dir.mkdir()
    for name, text in TASK_FILES.items():
        (task_dir / name).write_text(text.format(data_file=data_file) if name == "hellaswag_local.yaml" else text)

    api_out, cli_out = root / "simple_evaluate.json", root / "cli"
    run_all([
        [sys.executable, "-c", SIMPLE_EVALUATE, export, str(task_dir), str(api_out), model_args(export, custom),
         json.dumps(list(TASKS))],
        [sys.executable, "-m", "lm_eval", *cli_args(export, task_dir, cli_out, custom)],  # the documented command
    ], env, str(root))
    cli_files = glob.glob(str(cli_out / "**" / "results_*.json"), recursive=True)
    assert len(cli_files) == 1, cli_files
    with open(cli_files[0]) as f:
        cli = json.load(f)["results"]["hellaswag_local"]
    with open(api_out) as f:
        api = json.load(f)
    return dict(model=model, ckpt=ckpt, api=api, cli=cli, root=root, data_file=data_file)


def ours(runs, text):
    """hellaswag_eval.py's command line on the checkpoint, and its per-ending scores from the model in memory."""
    out = runs["root"] / f"ours_{text}.json"
    assert H.main(["--checkpoint", runs["ckpt"], "--data_file", runs["data_file"], "--dtype", "fp32", "--device", "cpu",
                   "--text", text, "--no_progress", "--out", str(out)]) == 0
    with open(out) as f:
        saved = json.load(f)
    scores = H.score(runs["model"], H.load_examples(runs["data_file"]), autocast_dtype=FP32, text=text)
    return saved, scores


@pytest.mark.parametrize("task", list(TASKS))
def test_lm_eval_scores_the_same_text_and_tokens(task, runs):
    theirs = runs["api"][task]
    examples = H.load_examples(runs["data_file"])
    if TASKS[task] == "lm_eval":
        examples = [H.lm_eval_text(ex) for ex in examples]
    assert theirs["n"] == len(examples) == 13
    enc = tg.get_tokenizer()
    for ex, arguments, target in zip(examples, theirs["arguments"], theirs["target"]):
        # lm-eval asks for (context, " " + choice): the same strings as ours
        assert arguments == [[ex["ctx"], " " + e] for e in ex["endings"]]
        assert target == ex["label"]
        # lm-eval tokenises context + continuation together and splits after the context's tokens; with no
        # whitespace at the end of the context that split is where ours is (each text is encoded separately)
        assert not ex["ctx"][-1:].isspace()
        ctx = enc.encode_ordinary(ex["ctx"])
        for e in ex["endings"]:
            assert enc.encode_ordinary(ex["ctx"] + " " + e) == ctx + enc.encode_ordinary(" " + e)
    if TASKS[task] == "lm_eval":  # the rewrite did something: WikiHow's markers gone, the activity label in front
        raw = H.load_examples(runs["data_file"])
        assert all(ex["ctx"].startswith(r["activity_label"] + ": ") for ex, r in zip(examples, raw))
        assert any("[" in r["ctx"] for r in raw) and not any("[" in ex["ctx"] for ex in examples)


@pytest.mark.parametrize("task", list(TASKS))
def test_lm_eval_acc_and_acc_norm_equal_ours(task, runs):
    theirs = runs["api"][task]
    saved, scores = ours(runs, TASKS[task])
    # every ending's log-likelihood: lm-eval through transformers on the export, ours through our GPT
    lls = torch.tensor(theirs["loglikelihood"], dtype=torch.float64)
    assert (lls + scores["loss_sum"]).abs().max().item() < 1e-3
    chars = torch.tensor([[len(c) for _, c in args] for args in theirs["arguments"]], dtype=torch.float64) - 1
    assert (lls / chars + scores["loss_per_char"]).abs().max().item() < 1e-4
    # no near-ties, so the equalities below cannot hinge on rounding
    for key in ("loss_sum", "loss_per_char", "loss_mean"):
        best_two = scores[key].topk(2, dim=1, largest=False).values
        assert (best_two[:, 1] - best_two[:, 0]).min().item() > 1e-3, key
    n = saved["n"]
    assert n == theirs["n"] == 13
    assert 0 < saved["correct"] < n and 0 < saved["correct_norm_chars"] < n  # neither all right nor all wrong
    assert saved["acc"] == theirs["acc"] == saved["correct"] / n
    assert saved["acc_norm_chars"] == theirs["acc_norm"] == saved["correct_norm_chars"] / n
    labels = scores["label"]
    assert saved["correct"] == int((scores["loss_sum"].argmin(1) == labels).sum())
    assert saved["correct_norm_chars"] == int((scores["loss_per_char"].argmin(1) == labels).sum())
    assert saved["correct_norm"] == int((scores["loss_mean"].argmin(1) == labels).sum())


def test_per_token_and_per_character_norms_pick_differently(runs):
    """On these examples the per-token mean (acc_norm) and lm-eval's per-character normalisation choose different
    endings, so matching lm-eval's acc_norm above took the per-character one."""
    differ = 0
    for text in TASKS.values():
        scores = H.score(runs["model"], H.load_examples(runs["data_file"]), autocast_dtype=FP32, text=text)
        differ += int((scores["loss_mean"].argmin(1) != scores["loss_per_char"].argmin(1)).sum())
    assert differ > 0


def test_lm_eval_command_line_equals_simple_evaluate(runs):
    api, cli = runs["api"]["hellaswag_local"], runs["cli"]
    assert (cli["acc,none"], cli["acc_norm,none"]) == (api["acc"], api["acc_norm"])


def test_readme_gives_these_task_files_and_this_command():
    with open(LM_EVAL_DOC) as f:
        text = f.read()
    section = text[text.index("## lm-evaluation-harness"):text.index("## Sampling")]
    files = {}
    for block in re.findall(r"```(?:yaml|python)\n(.*?)```", section, re.S):
        first, _, body = block.partition("\n")
        name = re.match(r"# tasks/(\S+?):? ", first + " ")
        if name:
            files[name.group(1)] = body
    expected = dict(TASK_FILES, **{"hellaswag_local.yaml": TASK_YAML.format(data_file=DOC_DATA_FILE)})
    assert files == expected
    commands = [" ".join(line.split()) for line in section.replace("\\\n", " ").splitlines()]
    assert " ".join(["lm_eval", *cli_args("out/hf", "tasks", "lm_eval_out")]) in commands
