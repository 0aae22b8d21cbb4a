"""The corpus: which files, their tokens, the cache, the held-out split and the windows."""

import numpy as np
import pytest
import torch
from helpers import ByteTokenizer

from gpt2_decl.training.data import (
    WindowSampler,
    evaluation_batches,
    find_text_files,
    load_corpus,
    split_tokens,
)


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "b.py").write_text("x = 1\n")
    (root / "sub" / "c.md").write_text("# gamma é\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".git" / "HEAD.txt").write_text("not a document")
    return root


def test_a_directory_means_its_text_files_recursively_without_hidden_ones(corpus_dir):
    found = find_text_files(corpus_dir)
    names = [path.relative_to(corpus_dir).as_posix() for path in found]
    assert names == ["a.txt", "b.py", "sub/c.md"]


def test_a_file_and_a_glob(corpus_dir):
    assert find_text_files(corpus_dir / "a.txt") == [(corpus_dir / "a.txt").resolve()]
    found = find_text_files(f"{corpus_dir}/**/*.md")
    assert found == [(corpus_dir / "sub" / "c.md").resolve()]


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        find_text_files(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no text files"):
        find_text_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        find_text_files(f"{tmp_path}/*.txt")


def test_documents_are_joined_with_the_end_of_text_token(corpus_dir, tmp_path):
    corpus = load_corpus(corpus_dir, ByteTokenizer(), cache_dir=tmp_path / "cache")
    eot = [ByteTokenizer.eot_id]
    expected = [*b"alpha\n", *eot, *b"x = 1\n", *eot, *"# gamma é\n".encode(), *eot]
    assert corpus.tokens.dtype == np.uint16
    assert corpus.tokens.tolist() == expected


def test_the_gpt2_tokenizer_gives_the_released_ids(tmp_path):
    text = tmp_path / "hello.txt"
    text.write_text("Hello world")
    assert load_corpus(text, cache_dir=tmp_path / "cache").tokens.tolist() == [15496, 995, 50256]


def test_the_cache_is_reused_while_unchanged_and_rebuilt_on_change(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    first = load_corpus(corpus_dir, ByteTokenizer(), cache_dir=cache)

    again = ByteTokenizer()
    second = load_corpus(corpus_dir, again, cache_dir=cache)
    assert second.path == first.path
    assert again.calls == 1  # only the fingerprint's probe: no document was tokenized

    (corpus_dir / "a.txt").write_text("alpha, changed\n")
    changed = ByteTokenizer()
    third = load_corpus(corpus_dir, changed, cache_dir=cache)
    assert third.path != first.path
    assert changed.calls == 1 + 3
    assert bytes(third.tokens[: len("alpha, changed\n")].tolist()) == b"alpha, changed\n"
    cached = sorted(path.name for path in cache.glob("*.bin"))
    assert cached == sorted([first.path.name, third.path.name])


def test_another_tokenizer_is_another_cache_entry(corpus_dir, tmp_path):
    class ShiftedBytes(ByteTokenizer):
        def encode(self, text: str) -> list[int]:
            return [token + 1 for token in super().encode(text)]

    plain = load_corpus(corpus_dir, ByteTokenizer(), cache_dir=tmp_path)
    shifted = load_corpus(corpus_dir, ShiftedBytes(), cache_dir=tmp_path)
    assert shifted.path != plain.path
    assert shifted.tokens[0] == plain.tokens[0] + 1


def test_the_held_out_split_is_the_last_fraction():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, n_ctx=8)
    assert train.tolist() == list(range(90))
    assert val.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match="held-out split has 10 tokens"):
        split_tokens(tokens, 0.1, n_ctx=16)
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(tokens, 1.0, n_ctx=8)


def test_windows_are_contiguous_and_targets_are_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = WindowSampler(tokens, n_ctx=16, batch_size=5, seed=0)
    inputs, targets = sampler.sample(torch.device("cpu"))
    assert inputs.shape == targets.shape == (5, 16) and inputs.dtype == torch.long
    for row, target in zip(inputs, targets, strict=True):
        start = int(row[0])
        assert row.tolist() == list(range(start, start + 16))
        assert target.tolist() == list(range(start + 1, start + 17))


def test_ranks_split_one_global_batch():
    """Two ranks at batch 3 read exactly the windows one process reads at batch 6."""
    tokens = np.arange(5000, dtype=np.uint16)
    cpu = torch.device("cpu")
    single = WindowSampler(tokens, n_ctx=8, batch_size=6, seed=3)
    ranks = [WindowSampler(tokens, 8, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        together = torch.cat([sampler.sample(cpu)[0] for sampler in ranks])
        assert torch.equal(together, single.sample(cpu)[0])


def test_the_sampler_state_resumes_the_same_windows():
    tokens = np.arange(5000, dtype=np.uint16)
    cpu = torch.device("cpu")
    sampler = WindowSampler(tokens, n_ctx=8, batch_size=4, seed=1)
    sampler.sample(cpu)
    state = sampler.state_dict()
    expected = [sampler.sample(cpu)[0] for _ in range(2)]
    fresh = WindowSampler(tokens, n_ctx=8, batch_size=4, seed=99)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.sample(cpu)[0], batch) for batch in expected)


def test_evaluation_counts_every_target_token_once_across_ranks():
    tokens = np.arange(8 * 10 + 5, dtype=np.uint16)  # 10 whole windows of 8, and a remainder
    cpu = torch.device("cpu")
    targets = [
        target
        for rank in range(3)
        for _, batch in evaluation_batches(tokens, 8, 4, cpu, rank=rank, world_size=3)
        for target in batch.tolist()
    ]
    assert sorted(token for row in targets for token in row) == list(range(1, 81))
    limited = [batch for _, batch in evaluation_batches(tokens, 8, 4, cpu, max_windows=5)]
    assert [len(batch) for batch in limited] == [4, 1]
