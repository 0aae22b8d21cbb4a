"""The output head's vocabulary padded to a multiple of 16 rows: only the head's GEMMs are
rewritten, and the logits are the same numbers, in rows of the padded length."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_logits, rewrites_in_trace

from gpt2_decl import GPT2
from gpt2_decl.core.compiling import compile_with
from gpt2_decl.speedups.padded_vocab import PaddedVocab
from gpt2_decl.speedups.upcast import UpcastProducts


@pytest.mark.parametrize("batch, seq, padded", [(1, 1, 0), (1, 2, 1), (3, 11, 1)])
def test_only_the_heads_gemm_is_padded(tiny_model, batch, seq, padded):
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    with torch.no_grad():
        counts = rewrites_in_trace(tiny_model, PaddedVocab(), tokens)
    # The blocks' products have biases (and 48, 144 or 192 rows); one row is a GEMV.
    assert counts == ({"padded_vocab": 1} if padded else {})


def test_a_vocabulary_of_a_multiple_of_16_is_left_alone(tiny_config, tokens):
    model = GPT2(dataclasses.replace(tiny_config, vocab_size=112)).eval()
    with torch.no_grad():
        assert rewrites_in_trace(model, PaddedVocab(), tokens) == {}


def test_padding_goes_with_the_upcast_products_it_follows(tiny_config, tokens):
    model = GPT2(tiny_config).to(torch.bfloat16).eval()
    with torch.no_grad():
        counts = rewrites_in_trace(model, PaddedVocab(UpcastProducts()), tokens)
    assert counts == {"upcast_linear": 9, "padded_vocab": 1}


class HeadByKeyword(torch.nn.Module):
    """A head whose product names its weight, for the rewrite's keyword branch."""

    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, d_model))

    def forward(self, x):
        logits = F.linear(x, weight=self.weight)
        return logits, logits.amax(-1)


def test_a_weight_passed_by_keyword_is_padded_and_every_user_reads_the_slice():
    head, x = HeadByKeyword(97, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        assert rewrites_in_trace(head, PaddedVocab(), x) == {"padded_vocab": 1}
        compiled = torch.compile(head, backend=PaddedVocab(), fullgraph=True)
        for rows in (x, x[:, :3]):  # a second sequence length: compiled again, dynamic
            (logits, top), (expected, expected_top) = compiled(rows), head(rows)
            assert logits.shape == expected.shape and logits.stride()[-2] == 112
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(top, expected_top, atol=1e-5, rtol=0)


def test_captured_logits_are_the_returned_ones(tiny_model, tokens):
    compiled = compile_with(tiny_model, PaddedVocab(), freeze=True, plan=None)
    with torch.no_grad():
        logits, cache = compiled.run_with_cache(tokens, ["logits", "blocks.1.resid_post"])
    torch.testing.assert_close(cache["logits"], logits, atol=0, rtol=0)
    torch.testing.assert_close(logits, reference_logits(tiny_model, tokens), atol=1e-5, rtol=0)
