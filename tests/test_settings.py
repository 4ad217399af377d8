"""A run's settings: one frozen Settings per run, resolved once from the command line (recipe, run length, checks),
every field a flag, and the startup line reproducing it; a recipe fills in what the command line leaves out; settings
that cannot work are refused in one line before anything is written. What a checkpoint fixes against what a restart
may change is tested with the other resumes, in test_train.py."""

import dataclasses
import math
import shlex

import pytest

import train_gpt2 as tg
from conftest import TINY, assert_one_line_error, cli, run_cli

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after


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


def test_recipe_fills_in_what_the_command_line_leaves_out():
    a = tg.parse_settings(["--model", "d4", "--recipe", "speedrun", "--muon_lr", "0.05", "--no-shuffle"])
    recipe = tg.RECIPES["speedrun"]["flags"]
    assert a.muon_lr == 0.05 and a.shuffle is False
    assert a.embed_lr == pytest.approx(recipe["embed_lr"] * math.sqrt(768 / 256))
    assert (a.optimizer, a.mlp, a.qk_norm, a.lr_schedule, a.untie) == ("normuon", "relu2", True, "wsd", True)
    plain = tg.parse_settings(["--model", "d4"])
    assert (plain.optimizer, plain.mlp, plain.qk_norm, plain.lr_schedule) == ("adamw", None, None, "cosine")


# ---------------------------------------------------------------------------------------------------------------
# settings refused in one line, nothing written


@pytest.mark.parametrize("flags, fragments", [
    (["--lr_schedule", "wsd", "--cooldown_frac", "0"], ["--cooldown_frac"]),
    (["--logit_softcap", "-1"], ["--logit_softcap"]),
])
def test_bad_recipe_flags_are_one_line(data_dir, tmp_path, flags, fragments):
    r = cli(TINY + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "out")] + flags)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--epochs", "1", "--max_steps", "5"], ["--epochs", "--max_steps"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "-0.5"], ["--epochs"]),
])
def test_bad_epochs_are_refused(shards, tmp_path, flags, fragments):
    out = tmp_path / "o"
    r = cli(TINY + ["--data_dir", shards[0], "--out_dir", str(out)] + flags)
    assert_one_line_error(r, *fragments)
    assert not out.exists()


def test_seq_len_longer_than_block_size(data_dir, tmp_path):
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", str(tmp_path / "o"),
                        "--seq_len", "64", "--block_size", "32", "--total_batch_size", "512"])
    assert_one_line_error(r, "--seq_len 64", "block_size 32")


def test_indivisible_batch(data_dir, tmp_path):
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", str(tmp_path / "o"),
                        "--total_batch_size", "300"])
    assert_one_line_error(r, "--total_batch_size 300", "128")
