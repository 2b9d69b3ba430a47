import numpy as np
import pytest
import torch
from train_helpers import write_corpus

from moe.errors import InputError
from moe.train.byte_files import ByteFiles
from moe.train.data import (
    NUM_PIECES,
    BatchSampler,
    TokenView,
    check_vocab,
    eval_batches,
    load_corpus,
    split_ranges,
    stdlib_files,
)


def test_default_corpus_is_the_standard_library_as_bytes():
    files = stdlib_files()
    assert len(files) > 100
    assert [f.name for f in files if f.name == "argparse.py"] == ["argparse.py"]
    assert not any("site-packages" in f.parts or "test" in f.parts[:-1] for f in files)
    corpus = load_corpus()
    assert corpus.is_bytes and corpus.tokens.dtype == np.uint8
    assert corpus.tokens.size == sum(f.stat().st_size for f in files) > 1_000_000
    assert b"def " in corpus.tokens[:200_000].tobytes()


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (12_345, 0.05), (99, 0.1), (10_000, 0.25)])
def test_split_covers_the_stream_once_and_spreads_validation(n, fraction):
    train, val = split_ranges(n, fraction)
    ranges = sorted(train + val)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    val_len = sum(e - s for s, e in val)
    assert abs(val_len - fraction * n) <= n / NUM_PIECES + 1
    assert split_ranges(n, fraction) == (train, val)  # deterministic
    if n >= 1000 and fraction == 0.1:  # every 10th piece: spread over the whole stream
        starts = [s for s, _ in val]
        assert starts[0] < n * 0.1 and starts[-1] > n * 0.9 and len(val) == 10


def test_token_view_reads_ranges_as_one_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    ranges = [(0, 100), (300, 310), (500, 900)]
    view = TokenView(tokens, ranges)
    reference = np.concatenate([tokens[s:e] for s, e in ranges])
    assert len(view) == len(reference)
    offsets = np.array([0, 95, 99, 105, 109, 400, len(reference) - 8])
    got = view.windows(offsets, 8)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.from_numpy(np.stack([reference[o : o + 8] for o in offsets]).astype(np.int64)))


def test_sampler_is_counter_based_and_resumes_exactly():
    view = TokenView(np.arange(5000, dtype=np.uint16), [(0, 5000)])
    a = BatchSampler(view, batch_size=4, seq_len=16, seed=3)
    batches = [a.next_batch() for _ in range(5)]
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    b = BatchSampler(view, batch_size=4, seq_len=16, seed=3)
    b.load_state_dict(BatchSampler(view, 4, 16, seed=3).state_dict() | {"position": 3})
    assert torch.equal(b.next_batch()[0], batches[3][0])
    other_seed = BatchSampler(view, batch_size=4, seq_len=16, seed=4)
    assert not torch.equal(other_seed.next_batch()[0], x)
    with pytest.raises(ValueError, match="data seed"):
        other_seed.load_state_dict(a.state_dict())


def test_ranks_draw_from_disjoint_shards():
    n, seq = 10_000, 16
    view = TokenView(np.arange(n, dtype=np.uint32), [(0, n)])
    seen = []
    for rank in range(4):
        sampler = BatchSampler(view, batch_size=64, seq_len=seq, seed=0, rank=rank, world_size=4)
        starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(10)])
        lo, hi = rank * (n - seq) // 4, (rank + 1) * (n - seq) // 4
        assert starts.min() >= lo and starts.max() < hi
        seen.append(starts)
    assert not torch.equal(seen[0] - seen[0].min(), seen[1] - seen[1].min())  # own streams


def test_eval_batches_are_fixed_and_cover_the_split():
    tokens = np.arange(3000, dtype=np.uint16)
    view = TokenView(tokens, [(0, 3000)])
    first, second = eval_batches(view, 4, 10, 3), eval_batches(view, 4, 10, 3)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts[0] == 0 and starts[-1] == 3000 - 11


def test_folder_corpus_reads_files_in_order_and_skips_hidden(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"BBB")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes(b"CC")
    (tmp_path / "a.txt").write_bytes(b"A")
    (tmp_path / ".hidden").write_bytes(b"dotfile")
    corpus = load_corpus(tmp_path)
    assert corpus.tokens.tobytes() == b"ABBBCC" and corpus.is_bytes


def test_token_files(tmp_path):
    np.save(tmp_path / "t16.npy", np.array([1, 2, 300], dtype=np.uint16))
    corpus = load_corpus(tmp_path / "t16.npy")
    assert not corpus.is_bytes and corpus.max_token == 300 and corpus.tokens.dtype == np.uint16
    np.array([7, 70_000], dtype=np.uint32).tofile(tmp_path / "t32.bin")
    corpus = load_corpus(tmp_path / "t32.bin", token_dtype="uint32")
    assert corpus.tokens.tolist() == [7, 70_000]
    with pytest.raises(ValueError, match="outside the vocabulary.*vocab_size = 300"):
        check_vocab(load_corpus(tmp_path / "t16.npy"), 300)
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="uint16 or uint32.*float32"):
        load_corpus(tmp_path / "f.npy")
    (tmp_path / "odd.bin").write_bytes(b"123")
    with pytest.raises(ValueError, match="not a whole number of uint16"):
        load_corpus(tmp_path / "odd.bin")


def test_bad_data_paths(tmp_path):
    with pytest.raises(ValueError, match="holds no non-empty files"):
        load_corpus(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no non-empty files"):
        load_corpus(tmp_path)
    with pytest.raises(InputError, match="data not found"):
        load_corpus(tmp_path / "missing.txt")
    view = TokenView(np.zeros(20, dtype=np.uint8), [(0, 20)])
    with pytest.raises(ValueError, match="too few for sequences of 32"):
        BatchSampler(view, 2, 32)
    with pytest.raises(InputError, match="val-fraction"):
        split_ranges(100, 1.5)


def test_a_folder_is_read_on_demand_as_the_concatenation_of_its_files(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in (37, 0, 1, 500, 64)]
    for i, part in enumerate(parts):
        (tmp_path / f"f{i}.txt").write_bytes(part.tobytes())
    corpus = load_corpus(tmp_path)
    reference = np.concatenate(parts)
    assert isinstance(corpus.tokens, ByteFiles) and len(corpus.tokens) == reference.size == 602
    # Windows across file boundaries (37|38|538), repeated and unsorted positions, any shape.
    index = np.array([[35, 36, 37, 38, 39], [601, 0, 537, 538, 538]])
    assert np.array_equal(corpus.tokens[index], reference[index])
    assert np.array_equal(corpus.tokens[30:540], reference[30:540]) and corpus.tokens[5:5].size == 0
    assert corpus.max_token == reference.max() and corpus.tokens.tobytes() == reference.tobytes()
    view = TokenView(corpus.tokens, split_ranges(len(corpus.tokens), 0.1)[0])
    in_memory = TokenView(reference, split_ranges(reference.size, 0.1)[0])
    sampled = BatchSampler(view, 8, 16, seed=1).next_batch()[0]
    assert torch.equal(sampled, BatchSampler(in_memory, 8, 16, seed=1).next_batch()[0])
    with pytest.raises(IndexError):
        corpus.tokens[np.array([602])]


def test_a_text_file_is_memory_mapped(tmp_path):
    path = write_corpus(tmp_path)
    corpus = load_corpus(path)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.tobytes() == path.read_bytes() and corpus.is_bytes
