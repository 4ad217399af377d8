"""The commands the README and docs/ give cannot rot: each names a file that exists and flags its script accepts
(its own parser reads the whole command line), the test command is the one CI runs, the quick start runs the
train_gpt2.py command it prints, and the multi-node command, run as two torchrun agents on this machine, trains as
one process does."""

import argparse
import functools
import glob
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest
import torch

import quickstart
import train_gpt2 as tg
from conftest import ROOT, TINY, free_port, load_weights, read_log, run_cli

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def bash_commands(path: str) -> list[list[str]]:
    """Every command of the page's ```bash blocks, as words: continuations joined, comments dropped, split at
    `&&` and `;`, leading VAR=value assignments and `srun` left out."""
    with open(path) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words, current = shlex.split(line, comments=True), []
            for word in [*words, "&&"]:
                if word not in ("&&", ";"):
                    current.append(word)
                    continue
                while current and (ENV_ASSIGNMENT.match(current[0]) or current[0] == "srun"):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
    return commands


@functools.cache
def documented() -> list[tuple[str, list[str]]]:
    return [(os.path.relpath(path, ROOT), words) for path in DOCS for words in bash_commands(path)]


def command_id(case) -> str:
    page, words = case
    return f"{page}: {' '.join(words)[:70]}"


class ReadItsCommandLine(Exception):
    """Raised where a script's parser first reads its command line: nothing after it runs."""

    def __init__(self, parser: argparse.ArgumentParser, args: list[str]):
        super().__init__()
        self.parser, self.args = parser, args


def parser_of(script: str, args: list[str], monkeypatch) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser a script builds and the arguments it hands it, from running the script as __main__ until it reads
    its command line."""
    def intercept(self, args=None, namespace=None):
        raise ReadItsCommandLine(self, sys.argv[1:] if args is None else list(args))

    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", intercept)
    with pytest.raises(ReadItsCommandLine) as caught:
        runpy.run_path(script, run_name="__main__")
    monkeypatch.undo()
    return caught.value.parser, caught.value.args


def check_python_script(script: str, args: list[str], monkeypatch, capsys) -> None:
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"{script} does not exist"
    parser, handed = parser_of(path, args, monkeypatch)
    try:
        parser.parse_args(handed)
    except SystemExit:
        pytest.fail(f"{script} refuses {shlex.join(args)}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    except Exception as e:  # a parser whose error() raises the script's one-line error instead of exiting
        pytest.fail(f"{script} refuses {shlex.join(args)}: {e}")


def check_bash_script(script: str, args: list[str]) -> None:
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"{script} does not exist"
    usage = subprocess.run(["bash", path, "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", usage), f"{script} --help does not know {flag}"


@pytest.mark.parametrize("case", documented(), ids=command_id)
def test_documented_command_names_real_files_and_flags(case, monkeypatch, capsys):
    page, words = case
    program, args = words[0], words[1:]
    if program == "python" and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"{page}: no module {args[1]}"
    elif program == "python" and args[:1] != ["-c"]:
        check_python_script(args[0], args[1:], monkeypatch, capsys)
    elif program == "torchrun":
        at = next(i for i, w in enumerate(args) if w.endswith(".py"))
        check_python_script(args[at], args[at + 1:], monkeypatch, capsys)
    elif program == "bash":
        check_bash_script(args[0], args[1:])
    elif program == "pip":
        for i, word in enumerate(args):
            if word == "-r":
                assert os.path.isfile(os.path.join(ROOT, args[i + 1])), f"{page}: no {args[i + 1]}"


def test_every_page_gives_commands_and_the_checks_see_them():
    pages = {page for page, _ in documented()}
    assert "README.md" in pages and len(pages) >= 5
    programs = {words[0] for _, words in documented()}
    assert {"python", "torchrun", "bash", "pip"} <= programs


def readme_block(heading: str) -> list[str]:
    """The lines of the first ```bash block under a README heading, as written."""
    with open(DOCS[0]) as f:
        text = f.read()
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_quick_start_is_two_short_commands_installing_then_training():
    install, train = readme_block("## Quick start")
    assert len(install) < 100 and len(train) < 100
    assert install == "pip install -r requirements.txt"
    assert train.split()[:2] == ["python", "quickstart.py"]
    # and it trains with the recipe on the bundled corpus, whose shards it prepares
    flags, _ = tg.parse_flags(quickstart.command([]))
    assert flags["recipe"] == "speedrun" and flags["data_dir"] == quickstart.SAMPLE_DIR


def test_docs_give_the_command_the_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no earlier quick start here, so the command names out/quickstart
    assert ["python", "train_gpt2.py", *quickstart.command([])] in [words for _, words in documented()]


def test_the_test_command_is_the_one_ci_runs():
    (command,) = readme_block("## Tests")
    assert len(command) < 100
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f]
    assert command in ci_lines


# ---------------------------------------------------------------------------------------------------------------
# the quick start's script


QUICK = ["--model", "d2", "--seq_len", "32", "--batch_size", "4", "--total_batch_size", "128", "--max_steps", "3",
         "--val_every", "3", "--val_tokens", "512", "--sample_every", "3", "--sample_tokens", "4", "--device", "cpu",
         "--dtype", "fp32"]


def test_quick_start_prepares_once_and_runs_the_command_it_prints(tmp_path, monkeypatch, capsys, global_state):
    monkeypatch.chdir(tmp_path)
    quickstart.main(QUICK)
    first = capsys.readouterr().out
    assert f"-> {quickstart.SAMPLE_DIR}" in first  # tokenised the bundled corpus here
    printed = next(line for line in first.splitlines() if line.startswith("python train_gpt2.py "))
    argv = shlex.split(printed)[2:]
    assert ["--recipe", "speedrun"] == argv[argv.index("--recipe"):argv.index("--recipe") + 2]

    quickstart.main(QUICK)  # again: the shards are reused, the first run's folder is left alone
    second = capsys.readouterr().out
    assert "already complete" in second and f"--out_dir {quickstart.OUT_DIR}_2" in second

    # the printed command, run as it reads, trains exactly what the quick start trained
    os.rename(quickstart.OUT_DIR, "first")
    tg.main(argv)
    for a, b in zip(read_log("first"), read_log(quickstart.OUT_DIR), strict=True):
        assert [a.get(k) for k in ("train_loss", "val_loss", "grad_norm")] == [
            b.get(k) for k in ("train_loss", "val_loss", "grad_norm")]


# ---------------------------------------------------------------------------------------------------------------
# the multi-node command, as two nodes on this machine


def multi_node_command() -> list[str]:
    (words,) = [w for w in bash_commands(DOCS[0]) if w[0] == "torchrun" and "--nnodes" in w and "HOST:29500" in w]
    return words


def test_multi_node_command_as_two_agents_trains_as_one_process(data_dir, tmp_path):
    """The README's two-node command with HOST = 127.0.0.1 and one process per node: two torchrun agents meet in the
    c10d rendezvous and make the same losses and weights as one process on the same global batch."""
    words = multi_node_command()
    at = next(i for i, w in enumerate(words) if w.endswith(".py"))
    agent, train_args = words[1:at], words[at + 1:]
    port = free_port()
    agent = ["1" if a == "8" and agent[i - 1] == "--nproc_per_node" else a.replace("HOST:29500", f"127.0.0.1:{port}")
             for i, a in enumerate(agent)]
    # the README's training flags stay (--resume auto starts fresh in an empty folder); the tiny run's come after
    tiny = [*TINY, "--data_dir", data_dir, "--max_steps", "3", "--batch_size", "4"]
    nodes = str(tmp_path / "nodes")
    cmd = [sys.executable, "-m", "torch.distributed.run", *agent, os.path.join(ROOT, words[at]),
           *train_args, *tiny, "--out_dir", nodes]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
              for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in agents]
    for p, out, err in results:
        assert p.returncode == 0, err[-3000:]
    assert any("world size 2" in out for _, out, _ in results)

    one = str(tmp_path / "one")
    r = run_cli([*train_args, *tiny, "--out_dir", one])
    assert r.returncode == 0, r.stderr
    assert "2 micro-steps" in r.stdout
    for a, b in zip(read_log(one), read_log(nodes), strict=True):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    ckpt = "ckpt_0000003.pt"
    for name, w in load_weights(os.path.join(one, ckpt)).items():
        torch.testing.assert_close(w, load_weights(os.path.join(nodes, ckpt))[name], rtol=0, atol=1e-5)
