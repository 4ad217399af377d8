"""
The quick start: a small GPT-2 trained with the speedrun recipe on the bundled Gutenberg corpus, on any machine.

  python quickstart.py                     # tokenises data/gutenberg/ once, then trains (~5 minutes on 2 CPU cores)
  python quickstart.py --max_steps 200     # any train_gpt2.py flag replaces the quick start's own

It prints the train_gpt2.py command it runs: the next run can be that command, changed where you want.
"""

from __future__ import annotations

import os
import shlex
import sys

import prepare_fineweb
import train_gpt2 as tg

SAMPLE_DIR = "data/gutenberg"  # where `prepare_fineweb.py --sample` writes the bundled corpus's shards
OUT_DIR = "out/quickstart"

# The 4-layer preset on 4,096-token steps of 16 sequences of 256 tokens, 64 of them: under 5 minutes on a 2-core
# CPU, and enough for the validation loss to fall by half and the samples to be English words. Validation and
# samples come often, so the run shows its progress as it goes.
FLAGS = {
    "model": "d4",
    "recipe": "speedrun",
    "data_dir": SAMPLE_DIR,
    "seq_len": 256,
    "batch_size": 16,
    "total_batch_size": 4096,
    "max_steps": 64,
    "val_every": 8,
    "val_tokens": 8192,
    "sample_every": 32,
    "sample_tokens": 40,
    "prompt": "The old man said",
    "save_every": 0,  # only the final checkpoint
    "out_dir": OUT_DIR,
}


def free_out_dir(base: str) -> str:
    """base, or base_2, base_3, ... : the first that holds no checkpoints, so a second quick start never stops on
    the first one's run."""
    candidate, n = base, 1
    while os.path.isdir(candidate) and tg.list_checkpoints(candidate):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def command(user_argv: list[str]) -> list[str]:
    """The train_gpt2.py arguments: the quick start's flags, less those the user gave, then the user's own."""
    _, given = tg.parse_flags(user_argv)
    flags = {name: value for name, value in FLAGS.items() if name not in given}
    if "out_dir" in flags and "resume" not in given:
        flags["out_dir"] = free_out_dir(flags["out_dir"])
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))] + user_argv


def main(argv: list[str] | None = None) -> None:
    argv = command(sys.argv[1:] if argv is None else argv)
    flags, _ = tg.parse_flags(argv)
    if flags["data_dir"] == SAMPLE_DIR:
        # --resume makes this cheap after the first time: a complete folder is checked and left as it is
        status = prepare_fineweb.main(["--sample", "--resume", "--out_dir", SAMPLE_DIR])
        if status:
            sys.exit(status)
    print("python train_gpt2.py " + shlex.join(argv), flush=True)
    tg.main(argv)
    print(f"\nsample again: python sample.py --resume auto --out_dir {flags['out_dir']}")


if __name__ == "__main__":
    main()
