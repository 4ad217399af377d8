"""A run's settings: one frozen Settings per run, resolved once from the command line (recipe, run length, checks),
every field a flag, the startup line reproducing it, and what a checkpoint fixes against what a restart may change."""

import dataclasses
import shlex

import pytest

import train_gpt2 as tg
from test_options import assert_one_line_error, base_run, cli, copy_run, data, global_state, ok  # noqa: F401
from test_train import TINY


def test_settings_are_frozen_and_every_field_is_a_flag():
    settings = tg.parse_settings(["--model", "d4", "--lr", "0.01"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 0.02
    flags = {a.dest for a in tg.build_parser()._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(tg.Settings)} - {"explicit"}
    assert set(tg.FIXED_BY_CHECKPOINT) <= flags and set(tg.FLAG_GROUPS) <= flags
    assert settings.explicit == ("lr", "model") and settings.max_steps == tg.DEFAULT_MAX_STEPS


def test_resolving_changes_nothing_it_is_given():
    flags, explicit = tg.parse_flags(["--model", "d4", "--recipe", "speedrun", "--max_steps", "50"])
    before = dict(flags)
    settings = tg.resolve_settings(flags, explicit)
    assert flags == before  # the parsed flags are read, never written
    assert settings.optimizer == "normuon" and settings.warmup_steps == 1  # round(0.02 * 50)
    assert flags["optimizer"] == "adamw" and flags["warmup_steps"] == 715


@pytest.mark.parametrize("argv", [
    ["--model", "d4"],
    ["--model", "d4", "--recipe", "speedrun", "--head_lr", "0.02", "--max_steps", "77", "--prompt", "it's \"quoted\""],
    ["--model", "d2", "--norm", "rmsnorm", "--no-bias", "--lr", "0.1234567890123", "--compile", "--wandb", "p"],
])
def test_the_settings_line_reproduces_the_settings(argv):
    """The startup line's flags, parsed again, give the same settings: every value, floats to the last bit."""
    settings = tg.parse_settings(argv)
    again = tg.parse_settings(shlex.split(settings.as_flags()))
    assert dataclasses.replace(again, explicit=()) == dataclasses.replace(settings, explicit=())


def test_the_startup_line_and_the_checkpoint_show_the_settings(data, base_run):  # noqa: F811
    saved = tg.saved_settings_of(tg.load_checkpoint(f"{base_run}/ckpt_0000001.pt"))
    assert saved["max_steps"] == 1 and saved["seq_len"] == 32 and saved["lr"] == 3e-3
    assert saved.keys() == {f.name for f in dataclasses.fields(tg.Settings)}


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.004"], "--lr 0.003"),
    (["--seq_len", "16"], "--seq_len 32"),
    (["--total_batch_size", "512"], "--total_batch_size 256"),
    (["--seed", "7"], "--seed 1337"),
    (["--lr_schedule", "wsd"], "--lr_schedule cosine"),
])
def test_resume_with_another_fixed_setting_is_refused(data, base_run, tmp_path, flags, named):  # noqa: F811
    out = copy_run(base_run, tmp_path)
    r = cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0, "--resume", "auto"]
            + flags)
    assert_one_line_error(r, named, "to resume it")


def test_resume_may_change_the_micro_batch_and_the_run_length(data, base_run, tmp_path):  # noqa: F811
    out = copy_run(base_run, tmp_path)
    r = ok(cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 3, "--val_every", 0,
                       "--resume", "auto", "--batch_size", 2]))
    assert "resumed from" in r.stdout and "4 micro-steps" in r.stdout and "step     3/3" in r.stdout
