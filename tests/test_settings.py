"""A run's settings: one frozen Settings per run, resolved once from the command line (recipe, run length, checks),
every field a flag, and the startup line reproducing it. What a checkpoint fixes against what a restart may change is
tested with the other resumes, in test_options.py."""

import dataclasses
import shlex

import pytest

import train_gpt2 as tg


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
