"""Training text as tokens: a cached uint16 memory map, a held-out split, and random windows.

`--data` names a text file, a directory (every file under it whose suffix is in `TEXT_SUFFIXES`,
hidden directories skipped) or a glob (`"src/**/*.py"`). Each file is one document; documents are
joined with the tokenizer's end-of-text token. The tokens are written once to
`CACHE_DIR/<key>.bin` (uint16), where the key hashes the files' paths and contents and the
tokenizer's identity: unchanged inputs reuse the file, any change builds a new one.
"""

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from gpt2_decl.storage.atomic import atomic_write

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
GLOB_CHARACTERS = frozenset("*?[")
CACHE_ENV_VAR = "GPT2_DECL_CACHE"
# uint16 halves the file size against int32 and holds every GPT-2 id (< 50257).
TOKEN_DTYPE = np.uint16
# Bump when the layout of the cached file changes, so old caches are not misread.
CACHE_FORMAT = 1
# A fixed text whose encoding, with the class name and end-of-text id, identifies a tokenizer.
TOKENIZER_PROBE = "Hello world! A fingerprint: déjà vu, 東京, 1234 \n\tdef f(x): return x"
# A file is taken for binary (an image, an executable) when its first bytes hold a NUL, or when
# more than this fraction of its bytes are not UTF-8.
TEXT_PROBE_BYTES = 8192
MAX_UNDECODABLE_FRACTION = 0.01


class Tokenizer(Protocol):
    eot_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TokenCorpus:
    """Every document's tokens, end to end, read from the cache file without loading it."""

    tokens: np.ndarray  # uint16 memory map
    files: tuple[Path, ...]
    path: Path
    key: str
    skipped: tuple[Path, ...] = ()  # files that are not text

    def __len__(self) -> int:
        return len(self.tokens)


def default_cache_dir() -> Path:
    """$GPT2_DECL_CACHE, else $XDG_CACHE_HOME/gpt2_decl/tokens, else ~/.cache/gpt2_decl/tokens."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2_decl" / "tokens"


def find_text_files(data: str | os.PathLike, called: str = "--data") -> list[Path]:
    """The files `data` names, sorted: itself, the text files under it, or the glob's matches.
    Errors name it as `called` (the option that gave it)."""
    text = os.fspath(data)
    if GLOB_CHARACTERS & set(text):
        files = [Path(match) for match in glob.glob(text, recursive=True) if Path(match).is_file()]
        if not files:
            raise FileNotFoundError(f"{called} {text!r}: the glob matches no files")
        return sorted(path.resolve() for path in files)
    path = Path(text)
    if path.is_file():
        return [path.resolve()]
    if not path.is_dir():
        raise FileNotFoundError(f"{called} {text!r}: no such file or directory")
    files = sorted(
        found.resolve()
        for found in path.rglob("*")
        if found.is_file()
        and found.suffix in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in found.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"{called} {text!r}: the directory holds no text files "
            f"(suffixes {', '.join(TEXT_SUFFIXES)})"
        )
    return files


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    kind = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    return json.dumps([kind, tokenizer.eot_id, tokenizer.encode(TOKENIZER_PROBE)])


def load_corpus(
    data: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    cache_dir: str | os.PathLike | None = None,
    called: str = "--data",
) -> TokenCorpus:
    """The tokens of `data`, from the cache when its inputs are unchanged, else tokenized now.
    Errors name it as `called` (the option that gave it)."""
    if tokenizer is None:
        from gpt2_decl.text.tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer()
    found = find_text_files(data, called)
    contents = [path.read_bytes() for path in found]
    text = [is_text(content) for content in contents]
    if not any(text):
        raise ValueError(
            f"{called} {os.fspath(data)!r}: none of its {len(found)} files is text (UTF-8 without "
            f"NUL bytes), e.g. {found[0]}"
        )
    skipped = tuple(path for path, keep in zip(found, text, strict=True) if not keep)
    files = [path for path, keep in zip(found, text, strict=True) if keep]
    contents = [content for content, keep in zip(contents, text, strict=True) if keep]
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{tokenizer_fingerprint(tokenizer)}\n".encode())
    for path, content in zip(files, contents, strict=True):
        digest.update(f"{path}\n{len(content)}\n".encode())
        digest.update(hashlib.sha256(content).digest())
    key = digest.hexdigest()[:32]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = directory / f"{key}.bin"
    if not cache_path.exists():
        _write_tokens(cache_path, _tokenize(contents, tokenizer), data, files)
    tokens = np.memmap(cache_path, dtype=TOKEN_DTYPE, mode="r")
    return TokenCorpus(tokens=tokens, files=tuple(files), path=cache_path, key=key, skipped=skipped)


def is_text(content: bytes) -> bool:
    """Whether a file's bytes look like text: no NUL byte in its first part, and valid UTF-8 but
    for a few stray bytes (at most MAX_UNDECODABLE_FRACTION of them)."""
    if b"\0" in content[:TEXT_PROBE_BYTES]:
        return False
    undecodable = content.decode("utf-8", errors="replace").count("\ufffd")
    return undecodable <= MAX_UNDECODABLE_FRACTION * max(len(content), 1)


def _tokenize(contents: list[bytes], tokenizer: Tokenizer) -> np.ndarray:
    # The few undecodable bytes `is_text` lets through become U+FFFD.
    texts = [content.decode("utf-8", errors="replace") for content in contents]
    documents = [tokenizer.encode(text) for text in texts]
    ids = np.fromiter(
        (token for document in documents for token in (*document, tokenizer.eot_id)), dtype=np.int64
    )
    if ids.max() > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(
            f"token id {int(ids.max())} does not fit the cache's {np.dtype(TOKEN_DTYPE).name}"
        )
    return ids.astype(TOKEN_DTYPE)


def _write_tokens(cache_path: Path, tokens: np.ndarray, data: object, files: list[Path]) -> None:
    """The tokens, and a note for people of what they are; atomic, as processes may share it."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    description = {"data": os.fspath(data), "files": len(files), "tokens": len(tokens)}
    with atomic_write(cache_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(description, indent=1) + "\n")
    with atomic_write(cache_path) as tmp:
        tokens.tofile(tmp)


def split_tokens(
    tokens: np.ndarray, val_fraction: float, n_ctx: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out): the held-out split is the last `val_fraction` of the tokens.

    Each part must hold at least one window of n_ctx + 1 tokens (inputs and shifted targets).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = int(round(len(tokens) * val_fraction))
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    for name, part in (("training", train), ("held-out", val)):
        if len(part) < n_ctx + 1:
            raise ValueError(
                f"the {name} split has {len(part)} tokens, fewer than one window of n_ctx + 1 = "
                f"{n_ctx + 1}; give more text, a shorter --n-ctx or another --val-fraction "
                f"(the corpus has {len(tokens)} tokens)"
            )
    return train, val


def _windows(tokens: np.ndarray, starts: list[int], n_ctx: int, device: torch.device) -> Tensor:
    batch = torch.from_numpy(
        np.stack([tokens[start : start + n_ctx + 1] for start in starts]).astype(np.int64)
    )
    if device.type == "cuda":
        # From pinned memory the copy runs alongside the GPU's work instead of waiting for it.
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


class WindowSampler:
    """Random contiguous windows of n_ctx + 1 tokens, from one seeded generator.

    Every rank draws the same global batch of `batch_size * world_size` window starts from a
    generator seeded by `seed` alone, then reads only its own `batch_size` of them (rank r takes
    the r-th slice). So N processes at batch b see exactly the windows one process sees at batch
    N*b, and the generator's state (`state_dict`) is the data position for a resume.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        n_ctx: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(tokens) < n_ctx + 1:
            raise ValueError(
                f"{len(tokens)} tokens cannot fill one window of n_ctx + 1 = {n_ctx + 1} tokens"
            )
        self.tokens, self.n_ctx, self.batch_size = tokens, n_ctx, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def sample(
        self, device: torch.device
    ) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        """(inputs, targets): targets are the inputs shifted one token on."""
        n_starts = len(self.tokens) - self.n_ctx
        global_batch = self.batch_size * self.world_size
        starts = torch.randint(n_starts, (global_batch,), generator=self.generator)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        windows = _windows(self.tokens, mine, self.n_ctx, device)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def evaluation_batches(
    tokens: np.ndarray,
    n_ctx: int,
    batch_size: int,
    device: torch.device,
    max_windows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]]:
    """Consecutive, non-overlapping windows from the start of `tokens`, so every target token
    counts once: all of them, or the first `max_windows`. Rank r takes windows r, r + N, ...
    """
    n_windows = (len(tokens) - 1) // n_ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    mine = [index * n_ctx for index in range(rank, n_windows, world_size)]
    for first in range(0, len(mine), batch_size):
        windows = _windows(tokens, mine[first : first + batch_size], n_ctx, device)
        yield windows[:, :-1], windows[:, 1:]
