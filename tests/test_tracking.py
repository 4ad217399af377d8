"""--tensorboard and --wandb: what they wrote, read back with each tool's own file format, equals log.jsonl record for
record, across a stop and a --resume too; a missing package is one line naming the pip command."""

import glob
import json
import os
import sys

import pytest

import train_gpt2 as tg
from conftest import TINY, assert_one_line_error, cli, make_shards, ok, read_log

RUN = TINY + ["--max_steps", "6", "--save_every", "2"]


@pytest.fixture(scope="module")
def tracking_data(tmp_path_factory):
    """make_shards' default (smaller) shards."""
    folder = str(tmp_path_factory.mktemp("tracking_data"))
    make_shards(folder)
    return folder


def interrupted_run(tracking_data, out, *flags):
    """Steps 1-4, stopped; then --resume auto from the step-4 checkpoint to step 6."""
    ok(cli(RUN + ["--data_dir", tracking_data, "--out_dir", out, "--stop_at_step", "4", *flags]))
    ok(cli(RUN + ["--data_dir", tracking_data, "--out_dir", out, "--resume", "auto", *flags]))
    return read_log(out)


def assert_mirrors(log, series):
    """series: {key: {step: value}} as a tracker holds it; log: log.jsonl's records."""
    expected = {}
    for record in log:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(key, {})[record["step"]] = value
    assert set(series) >= set(expected) and {"train_loss", "val_loss", "lr", "tok_per_s"} <= set(expected)
    for key, points in expected.items():
        assert sorted(series[key]) == sorted(points), key  # every step once, none from before the resume twice
        for step, value in points.items():
            assert series[key][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, step)


def test_tensorboard_mirrors_log_jsonl_across_a_resume(tracking_data, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = str(tmp_path / "run")
    log = interrupted_run(tracking_data, out, "--tensorboard")
    events = event_accumulator.EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    series = {key: {e.step: e.value for e in events.Scalars(key)} for key in events.Tags()["scalars"]}
    assert_mirrors(log, series)
    # the arguments and config were written once, by the fresh run
    assert set(events.Tags()["tensors"]) >= {"settings/text_summary", "config/text_summary"}
    config_text = events.Tensors("config/text_summary")
    assert len(config_text) == 1 and b'"n_layer": 2' in config_text[0].tensor_proto.string_val[0]


def test_tensorboard_hides_the_steps_a_resume_redoes(tracking_data, tmp_path):
    """Steps 1-6 logged, then a resume from the step-2 checkpoint redoes 3-6: each step is shown once."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = str(tmp_path / "run")
    ok(cli(RUN + ["--data_dir", tracking_data, "--out_dir", out, "--tensorboard"]))
    ok(cli(RUN + ["--data_dir", tracking_data, "--out_dir", out, "--tensorboard", "--resume",
                  os.path.join(out, "ckpt_0000002.pt")]))
    events = event_accumulator.EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert_mirrors(read_log(out), {k: {e.step: e.value for e in events.Scalars(k)} for k in events.Tags()["scalars"]})


def wandb_records(path):
    """The protobuf Records of a W&B run file: a 7-byte ':W&B' header, then LevelDB's log format (32 KiB blocks of
    records with a 7-byte header: crc32c, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_mirrors_log_jsonl_across_a_resume(tracking_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    log = interrupted_run(tracking_data, out, "--wandb", "tracking-test")
    run_id = tg.load_checkpoint(os.path.join(out, "ckpt_0000006.pt"))["wandb_id"]
    files = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # one run, continued
    series, configs = {}, []
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for key, value in row.items():
                    if isinstance(value, (int, float)):
                        series.setdefault(key, {})[row["step"]] = value
            elif kind == "run":
                assert record.run.run_id == run_id and record.run.project == "tracking-test"
                configs.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                                for item in record.run.config.update})
    assert_mirrors(log, series)
    assert configs and configs[0]["config"]["n_layer"] == 2 and configs[0]["settings"]["max_steps"] == 6


def test_missing_tracker_packages_are_one_line(tracking_data, tmp_path, monkeypatch):
    for flags, package in ((["--tensorboard"], "tensorboard"), (["--wandb", "p"], "wandb")):
        blocked = {"torch.utils.tensorboard": None} if package == "tensorboard" else {"wandb": None}
        with monkeypatch.context() as m:
            for name, value in blocked.items():
                m.setitem(sys.modules, name, value)  # import of a None entry raises ImportError
            result = cli(RUN + ["--data_dir", tracking_data, "--out_dir", str(tmp_path / package), *flags])
        assert_one_line_error(result, f"pip install {package}")
