"""Which module imports which: train_gpt2.py imports none of the repository's other modules and the helper scripts
import it; data preparation (prepare_fineweb.py, gpt2_tokens.py) never imports torch or the trainer, not even while it
runs; and the trainer loads torch's FSDP modules only for --fsdp."""

import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT


def test_imports_run_one_way():
    """train_gpt2.py imports none of the repository's other modules; the helper scripts import it; prepare_fineweb
    does not (it starts without torch)."""
    import ast

    def imported(name):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    ours = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))
            + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))} - {"train_gpt2"}
    assert {"sample", "export_hf", "hellaswag_eval", "prepare_fineweb", "gpt2_tokens", "bench_step"} <= ours
    assert not imported("train_gpt2.py") & ours
    for helper in ("hellaswag_eval.py", "sample.py", "export_hf.py", os.path.join("benchmarks", "bench_step.py")):
        assert "train_gpt2" in imported(helper), helper
    assert "train_gpt2" not in imported("prepare_fineweb.py")


def test_prep_imports_neither_torch_nor_the_trainer():
    """prep and its token module import neither torch nor train_gpt2; train_gpt2 imports neither of them."""

    def imported(name: str) -> set[str]:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    for helper in ("prepare_fineweb.py", "gpt2_tokens.py"):
        assert not imported(helper) & {"torch", "train_gpt2"}, helper
    assert "gpt2_tokens" in imported("prepare_fineweb.py")
    assert not imported("train_gpt2.py") & {"gpt2_tokens", "prepare_fineweb"}


def test_a_whole_prep_run_never_imports_torch(tmp_path):
    """Not at import, and not during a run either (datasets, for one, imports torch where asked to format for it)."""
    code = ("import sys; import prepare_fineweb; at_import = sorted({'torch', 'train_gpt2'} & set(sys.modules)); "
            f"code = prepare_fineweb.main(['--sample', '--out_dir', {str(tmp_path / 'out')!r}, "
            f"'--cache_dir', {str(tmp_path / 'hf')!r}]); "
            "print(at_import, sorted({'torch', 'train_gpt2'} & set(sys.modules)), code)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[] [] 0"


def test_fsdp_modules_are_imported_only_by_fsdp():
    """torch.distributed.tensor and .fsdp add 1.5 s to every start on a 2-core CPU; only --fsdp imports them (the
    FSDP tests show that the shards are still recognised)."""
    code = ("import sys, train_gpt2; print(sorted(m for m in sys.modules "
            "if m.startswith(('torch.distributed.tensor', 'torch.distributed.fsdp'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
