"""The data side of train_gpt2.py: llm.c shards and .npy files, the loader (every token once per epoch, ranks
disjoint, its state resumes the same batches), BOS-aligned and shuffled rows, and damaged or missing data named in
one line."""

import numpy as np
import pytest
import torch

import gpt2_tokens
import train_gpt2 as tg
from conftest import EOT, TINY, assert_one_line_error, cli, document_shards, make_shards, run_cli

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after


# ---------------------------------------------------------------------------------------------------------------
# shards and loader


def test_shard_round_trip_and_npy(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    gpt2_tokens.write_shard(str(tmp_path / "a_train_0.bin"), tokens)
    header = np.fromfile(tmp_path / "a_train_0.bin", dtype=np.int32, count=256)
    assert (header[0], header[1], header[2]) == (20240520, 1, 1000)
    assert np.array_equal(tg.read_shard(str(tmp_path / "a_train_0.bin")), tokens)
    np.save(tmp_path / "b_train_1.npy", tokens[::-1].copy())
    stream = tg.TokenStream(str(tmp_path), "train")
    assert np.array_equal(stream.read(0, 2000), np.concatenate([tokens, tokens[::-1]]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_covers_every_token_once_per_epoch_and_ranks_are_disjoint(tmp_path, world_size):
    # unique token values make every position identifiable; shard sizes are not multiples of anything
    tokens = np.arange(2 * 1237 + 901, dtype=np.uint16)
    gpt2_tokens.write_shard(str(tmp_path / "u_train_1.bin"), tokens[:1237])
    gpt2_tokens.write_shard(str(tmp_path / "u_train_2.bin"), tokens[1237:2 * 1237])
    gpt2_tokens.write_shard(str(tmp_path / "u_train_3.bin"), tokens[2 * 1237:])
    B, T = 3, 16
    loaders = [tg.ShardLoader(str(tmp_path), "train", B, T, r, world_size) for r in range(world_size)]
    steps_per_epoch = (len(tokens) - 1) // (B * T * world_size)
    seen = []
    for _ in range(steps_per_epoch):
        batches = [loader.next_batch() for loader in loaders]
        for x, y in batches:
            assert torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
            seen.append(x.flatten())
        assert len({loader.epoch for loader in loaders}) == 1
    seen = torch.cat(seen).numpy()
    assert len(np.unique(seen)) == len(seen)  # no token twice: ranks are disjoint
    assert np.array_equal(np.sort(seen), tokens[: len(seen)])  # a prefix of the stream, across shard boundaries
    assert len(tokens) - len(seen) < B * T * world_size + 1  # only the tail too short for a step is left out
    # the next step starts epoch 1 on every rank at once, from the first token
    x, _ = loaders[0].next_batch()
    assert all(loader.epoch == 0 for loader in loaders[1:]) and loaders[0].epoch == 1
    assert x.flatten()[0].item() == tokens[0]


def test_loader_state_resumes_the_same_batches(tmp_path):
    make_shards(str(tmp_path))
    a = tg.ShardLoader(str(tmp_path), "train", 2, 40)
    for _ in range(50):
        a.next_batch()
    b = tg.ShardLoader(str(tmp_path), "train", 2, 40)
    b.load_state_dict(a.state_dict())
    for _ in range(80):  # crosses an epoch boundary too
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("damage", ["magic", "truncated", "version", "short"])
def test_corrupt_shards_are_named(tmp_path, damage):
    path = str(tmp_path / "c_train_1.bin")
    gpt2_tokens.write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(open(path, "rb").read())
    if damage == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif damage == "truncated":
        raw = raw[:-10]
    else:
        raw = raw[:100]
    open(path, "wb").write(bytes(raw))
    with pytest.raises(tg.UserError, match="c_train_1.bin"):
        tg.read_shard(path)


def test_token_outside_vocabulary_is_named(tmp_path):
    gpt2_tokens.write_shard(str(tmp_path / "v_train_1.bin"), np.full(500, 60000, dtype=np.uint16))
    loader = tg.ShardLoader(str(tmp_path), "train", 2, 16)
    with pytest.raises(tg.UserError, match="60000"):
        loader.next_batch()


# ---------------------------------------------------------------------------------------------------------------
# BOS-aligned and shuffled rows


def test_bos_aligned_rows_start_at_documents_or_continue_long_ones(tmp_path):
    T = 16
    lengths = np.random.default_rng(1).integers(3, 45, 120)
    stream = document_shards(str(tmp_path), lengths)
    starts = np.flatnonzero(stream == EOT)
    loader = tg.ShardLoader(str(tmp_path), "train", 4, T, bos_aligned=True)
    rows = loader.rows
    # by the definition, found here by walking the documents
    want, pos = [], 0
    ends = dict(zip(starts, np.append(starts[1:], len(stream))))
    allowed = sorted({s + k * T for s in starts for k in range(-(-(ends[s] - s) // T))})
    while True:
        nxt = [a for a in allowed if a >= pos]
        if not nxt or nxt[0] + T + 1 > len(stream):
            break
        want.append(nxt[0])
        pos = nxt[0] + T
    assert rows.tolist() == want
    assert all(stream[r] == EOT or (r - starts[starts <= r][-1]) % T == 0 for r in rows)
    assert loader.skipped_tokens() == len(stream) - 1 - T * len(rows) > 0


@pytest.mark.parametrize("bos_aligned", [True, False])
def test_shuffled_rows_are_read_once_per_epoch_by_one_rank_in_a_seeded_order(tmp_path, bos_aligned):
    T, B, W = 8, 3, 2
    stream = document_shards(str(tmp_path), np.random.default_rng(2).integers(3, 30, 150))
    loaders = [tg.ShardLoader(str(tmp_path), "train", B, T, r, W, bos_aligned=bos_aligned, shuffle=True, seed=5)
               for r in range(W)]
    rows = loaders[0].rows
    index = {tuple(stream[s:s + 2]): i for i, s in enumerate(rows)}  # body tokens are unique: 2 name a row
    assert len(index) == len(rows)
    per_epoch = len(rows) // (B * W)
    epochs = []
    for epoch in range(2):
        seen = []
        for _ in range(per_epoch):
            for loader in loaders:
                x, y = loader.next_batch()
                for row_x, row_y in zip(x.numpy(), y.numpy()):
                    i = index[tuple(row_x[:2])]
                    assert np.array_equal(row_x, stream[rows[i]:rows[i] + T])
                    assert np.array_equal(row_y, stream[rows[i] + 1:rows[i] + T + 1])
                    seen.append(i)
        assert len(seen) == len(set(seen)) == per_epoch * B * W  # each row once, never by two ranks
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])
    again = tg.ShardLoader(str(tmp_path), "train", B, T, 0, W, bos_aligned=bos_aligned, shuffle=True, seed=5)
    again.load_state_dict(loaders[0].state_dict())
    for loader in (loaders[0], again):
        loader.epoch, loader.position = 1, 2 * B * W
    assert torch.equal(again.next_batch()[0], loaders[0].next_batch()[0])


# ---------------------------------------------------------------------------------------------------------------
# bad data on the command line: one line, non-zero exit, nothing written


def test_bos_aligned_without_documents_is_one_line(tmp_path):
    make_shards(str(tmp_path), vocab=1000)
    r = cli(TINY + ["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--bos_aligned"])
    assert_one_line_error(r, "--bos_aligned", "<|endoftext|>")


def test_missing_data_dir(tmp_path):
    out = tmp_path / "out"
    r = run_cli(TINY + ["--data_dir", str(tmp_path / "nope"), "--max_steps", "1", "--out_dir", str(out)])
    assert_one_line_error(r, "does not exist", "prepare_fineweb.py")
    assert not out.exists()


def test_corrupt_header_on_the_cli(tmp_path):
    make_shards(str(tmp_path / "d"))
    path = tmp_path / "d" / "t_train_000002.bin"
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(1).tobytes()
    path.write_bytes(bytes(raw))
    r = run_cli(TINY + ["--data_dir", str(tmp_path / "d"), "--max_steps", "1", "--out_dir", str(tmp_path / "o")])
    assert_one_line_error(r, "t_train_000002.bin", "magic")
    assert not (tmp_path / "o").exists()
