import gc
import weakref

import pytest
import torch
from helpers import HostReads
from torch._dynamo.testing import CompileCounter

from gpt2_decl import GPT2, GPT2Config, KVCache, typechecked
from gpt2_decl.cli import main
from gpt2_decl.cli.generate import stream_text
from gpt2_decl.text import generation
from gpt2_decl.text.generation import generate, sample, stream
from gpt2_decl.text.tokenizer import GPT2Tokenizer

# Logits spread wide enough that greedy choices are never near-ties between implementations.
DECISIVE = GPT2Config(
    vocab_size=211, n_ctx=48, d_model=48, n_layer=2, n_head=4, init_std=0.2, seed=3
)


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2(DECISIVE).eval()


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(DECISIVE.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def longhand_greedy(model: GPT2, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the slow, obvious way: rerun the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_greedy_with_the_cache_equals_rerunning_the_whole_sequence(model, prompt):
    expected = longhand_greedy(model, prompt, 20)
    assert torch.equal(model.generate(prompt, 20, greedy=True), expected)
    assert torch.equal(model.generate(prompt, 20, greedy=True, use_cache=False), expected)


def test_sampling_with_and_without_the_cache_gives_the_same_tokens(model, prompt):
    options = dict(temperature=0.8, top_k=50, top_p=0.95)
    cached = model.generate(prompt, 20, generator=seeded(7), **options)
    uncached = model.generate(prompt, 20, generator=seeded(7), use_cache=False, **options)
    assert cached.shape == (3, 26)
    assert torch.equal(cached, uncached)


def test_typechecked_mode_checks_the_cached_path_and_changes_nothing(model, prompt):
    with typechecked(True):
        checked = model.generate(prompt, 5, greedy=True)
    assert torch.equal(checked, longhand_greedy(model, prompt, 5))


def test_greedy_equals_transformers_generate_token_for_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        vocab_size=211, n_positions=48, n_embd=48, n_layer=3, n_head=4, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(11)
    reference = transformers.GPT2LMHeadModel(hf_config).eval()
    reference.save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path)
    prompt = torch.randint(211, (2, 5), generator=seeded(1))
    with torch.no_grad():
        expected = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False
        )
    assert expected.shape == (2, 35)
    assert torch.equal(ours.generate(prompt, 30, greedy=True), expected)


def test_rows_stop_at_eos_and_are_padded_with_it(model, prompt):
    free = model.generate(prompt, 20, greedy=True)[:, prompt.shape[1]:]
    eos_id = int(free[0, 3])  # row 0 meets it at step 3 at the latest
    stops = [int((row == eos_id).nonzero()[0]) if (row == eos_id).any() else None for row in free]
    stopped = model.generate(prompt, 20, greedy=True, eos_id=eos_id)[:, prompt.shape[1]:]
    if None in stops:
        assert stopped.shape[1] == 20
    else:  # every row finished: generation ends with the last one to finish
        assert stopped.shape[1] == max(stops) + 1
    for row, stop in enumerate(stops):
        end = stopped.shape[1] if stop is None else stop + 1
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == eos_id).all()


def test_generation_ends_early_when_every_row_has_stopped(model):
    prompt = torch.randint(DECISIVE.vocab_size, (1, 4), generator=seeded(5))
    first = int(model.generate(prompt, 1, greedy=True)[0, -1])
    assert model.generate(prompt, 20, greedy=True, eos_id=first).shape == (1, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_of_tied_most_likely_tokens(dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 0.25, 0.5]], dtype=dtype)
    assert sample(logits, greedy=True).tolist() == [1, 0]


def test_top_k_of_one_and_a_tiny_top_p_are_greedy(model, prompt):
    greedy = model.generate(prompt, 15, greedy=True)
    assert torch.equal(model.generate(prompt, 15, top_k=1, generator=seeded(1)), greedy)
    assert torch.equal(model.generate(prompt, 15, top_p=1e-6, generator=seeded(2)), greedy)


def test_seeded_sampling_is_reproducible_and_seeds_differ(model, prompt):
    first = model.generate(prompt, 20, generator=seeded(4))
    assert torch.equal(model.generate(prompt, 20, generator=seeded(4)), first)
    assert not torch.equal(model.generate(prompt, 20, generator=seeded(5)), first)


def test_top_k_samples_only_from_the_k_most_likely_tokens(model):
    prompt = torch.randint(DECISIVE.vocab_size, (1, 4), generator=seeded(6))
    with torch.no_grad():
        allowed = model(prompt)[0, -1].topk(3).indices
    draws = [int(model.generate(prompt, 1, top_k=3, generator=seeded(s))[0, -1]) for s in range(40)]
    assert set(draws) <= set(allowed.tolist())
    assert len(set(draws)) > 1


def test_compiled_decode_step_compiles_once_for_every_token_and_length(model, prompt):
    counter = CompileCounter()
    eager = model.generate(prompt, 20, greedy=True)
    assert torch.equal(model.generate(prompt, 20, greedy=True, compile=counter), eager)
    assert torch.equal(model.generate(prompt, 9, greedy=True, compile=counter), eager[:, :15])
    assert counter.frame_count == 1


def test_inductor_decode_equals_eager_and_sees_weights_changed_in_place():
    model = GPT2(DECISIVE.replace(n_layer=1)).eval()
    prompt = torch.randint(DECISIVE.vocab_size, (2, 5), generator=seeded(8))
    assert torch.equal(
        model.generate(prompt, 10, greedy=True, compile=True), longhand_greedy(model, prompt, 10)
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1.5)
    assert torch.equal(
        model.generate(prompt, 10, greedy=True, compile=True), longhand_greedy(model, prompt, 10)
    )


def test_compiled_generation_leaves_every_parameter_where_it_was():
    model = GPT2(DECISIVE.replace(n_layer=1)).eval()
    before = {name: (p.data_ptr(), p.untyped_storage().data_ptr()) for name, p in
              model.named_parameters()}
    # The sizes of the test above, whose compiled step this one reuses.
    model.generate(torch.randint(DECISIVE.vocab_size, (2, 5), generator=seeded(2)), 10,
                   greedy=True, compile=True)
    after = {name: (p.data_ptr(), p.untyped_storage().data_ptr()) for name, p in
             model.named_parameters()}
    assert after == before


def test_the_cache_moves_its_own_length_on_with_every_pass(model, prompt):
    cache = KVCache(DECISIVE, 3, 10, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(prompt, cache)
        assert int(cache.length) == 6
        model(prompt[:, :1], cache)
        assert int(cache.length) == 7
        assert cache.reserve(2).tolist() == [7, 8] and int(cache.length) == 9
        cache.length.fill_(7)
        with pytest.raises(ValueError, match="room for 3 more of its 10 positions, not 6"):
            model(prompt, cache)


def test_a_tiny_temperature_samples_greedily(model, prompt):
    greedy = model.generate(prompt, 8, greedy=True)
    assert torch.equal(model.generate(prompt, 8, temperature=1e-30, generator=seeded(3)), greedy)


def test_columns_after_every_row_stopped_are_dropped():
    eos = 9
    new = torch.tensor([[1, 9, 9, 9, 9], [2, 3, 9, 9, 9]])
    assert generation._columns_until_all_stopped(new, eos) == 3
    running = torch.tensor([[1, 9, 9], [2, 3, 4]])
    assert generation._columns_until_all_stopped(running, eos) == 3


def test_generation_restores_the_train_mode_and_leaves_gradients_on(prompt):
    model = GPT2(DECISIVE.replace(dropout=0.5)).train()
    expected = longhand_greedy(model.eval(), prompt, 5)
    model.train()
    tokens = stream(model, prompt, 5, greedy=True)
    assert torch.equal(next(tokens), expected[:, 6])
    assert torch.is_grad_enabled()  # no_grad applies inside the generator's steps only
    assert torch.equal(torch.stack(list(tokens), dim=1), expected[:, 7:])
    assert model.training


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(eos_id=211), r"eos_id must be a token id in \[0, 211\)"),
        (dict(max_new_tokens=43), "49 tokens, more than the context of 48"),
    ],
)
def test_bad_arguments_are_refused_clearly(model, prompt, options, message):
    options = {"max_new_tokens": 3, **options}
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, **options)


def test_bad_tokens_are_refused_clearly(model):
    with pytest.raises(TypeError, match="integer dtype"):
        model.generate(torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, 211]]), 2)


def test_greedy_needs_no_temperature_and_zero_new_tokens_returns_the_prompt(model, prompt):
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert model.generate(prompt, 2, greedy=True, temperature=0.0).shape == (3, 8)


def test_cache_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match=r"cache length must be in \[1, 48\]"):
        KVCache(DECISIVE, 1, 49, dtype=torch.float32, device=torch.device("cpu"))


def test_streamed_text_keeps_characters_split_across_tokens():
    tokenizer = GPT2Tokenizer()
    text = "Chào 🙂 thế giới"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # split characters exist
    assert "".join(stream_text(ids, tokenizer)) == text


def test_cli_generates_from_a_checkpoint(tmp_path, capsys):
    model = GPT2(GPT2Config(n_ctx=32, d_model=32, n_layer=1, n_head=2, init_std=0.2)).eval()
    model.save_pretrained(tmp_path)
    tokenizer = GPT2Tokenizer()
    prompt = "Hello world"
    expected = model.generate(torch.tensor([tokenizer.encode(prompt)]), 5, greedy=True)
    main(["generate", "--prompt", prompt, "--checkpoint", str(tmp_path),
          "--max-new-tokens", "5", "--greedy", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(expected[0].tolist()) + "\n"
    assert "tokens/s" in err
    assert "RANDOM" not in err


def test_cli_says_when_the_weights_are_random(capsys, monkeypatch):
    # A tiny preset stands in for GPT-2 small, which is slow to initialise.
    monkeypatch.setitem(GPT2Config.PRESETS, "small", dict(n_layer=1, n_head=2, d_model=32))
    main(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out.startswith("Hi")
    assert "weights are RANDOM" in err


def test_cli_refuses_a_prompt_longer_than_the_context(capsys, monkeypatch):
    monkeypatch.setitem(GPT2Config.PRESETS, "small", dict(n_layer=1, n_head=2, d_model=32))
    with pytest.raises(SystemExit, match="more than the context of 1024"):
        main(["generate", "--prompt", "Hi", "--max-new-tokens", "1024", "--device", "cpu"])


@pytest.mark.parametrize("compile", [False, True])
def test_decoding_steps_read_nothing_back_from_the_device(model, compile):
    # Prompts of different lengths, 12 tokens each: the compiled step is the ragged test's below.
    tokens = stream(model, RAGGED, 12, greedy=True, compile=compile)
    next(tokens), next(tokens)  # the prompt's pass, and the first (compiling) step
    with HostReads() as mode:
        for _ in range(8):
            next(tokens)
    assert mode.calls == []


# --- prompts of different lengths ------------------------------------------------------------

RAGGED = [[5, 17, 200], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5], [42]]


@pytest.mark.parametrize("compile", [False, True])
def test_each_of_a_batch_of_ragged_prompts_decodes_as_it_would_alone(model, compile):
    together = model.generate(RAGGED, 12, greedy=True, compile=compile)
    for prompt, row in zip(RAGGED, together, strict=True):
        alone = model.generate(torch.tensor([prompt]), 12, greedy=True)[0].tolist()
        assert row == alone


def test_seeded_sampling_with_a_generator_per_row_matches_each_prompt_alone(model):
    options = dict(temperature=0.9, top_k=20)
    together = model.generate(RAGGED, 10, generator=[seeded(i) for i in range(len(RAGGED))],
                              **options)
    for index, (prompt, row) in enumerate(zip(RAGGED, together, strict=True)):
        alone = model.generate(torch.tensor([prompt]), 10, generator=seeded(index), **options)
        assert row == alone[0].tolist()


def test_a_padded_tensor_with_its_mask_equals_the_list(model):
    longest = max(len(prompt) for prompt in RAGGED)
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in RAGGED])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in RAGGED])
    out = model.generate(padded, 6, greedy=True, attention_mask=mask)
    assert out.shape == (len(RAGGED), longest + 6)
    expected = model.generate(RAGGED, 6, greedy=True)
    for prompt, row, listed in zip(RAGGED, out, expected, strict=True):
        assert row[longest - len(prompt):].tolist() == listed  # the padding before it kept


def test_rows_of_a_list_end_at_their_own_eos(model):
    free = model.generate(RAGGED, 10, greedy=True)
    eos = free[0][len(RAGGED[0]) + 2]  # what the first row makes third
    stopped = model.generate(RAGGED, 10, greedy=True, eos_id=eos)
    assert stopped[0] == free[0][: len(RAGGED[0]) + 3]
    for prompt, row, full in zip(RAGGED, stopped, free, strict=True):
        new = full[len(prompt):]
        end = new.index(eos) + 1 if eos in new else len(new)
        assert row == prompt + new[:end]


@pytest.mark.parametrize(("prompts", "options", "error", "message"), [
    ([[1, 2], []], {}, ValueError, "prompt 1 is empty"),
    ([[1, 2], [3, 211]], {}, ValueError, r"prompt 1 holds token id 211, outside the vocabulary"),
    ([[1, 2], "abc"], {}, TypeError, "prompt 1 is a str, not a list of ids"),
    ([], {}, TypeError, "a non-empty list of prompts"),
    ([[1, 2], [3]], dict(use_cache=False), ValueError, "decoded with the cache"),
    ([[1, 2], [3]], dict(generator=[torch.Generator()]), ValueError, "1 generators for 2 rows"),
    ([[1, 2], [3]], dict(attention_mask=torch.ones(2, 2)), ValueError, "needs none"),
    ([[1] * 40, [3]], dict(max_new_tokens=9), ValueError, "more than the context of 48"),
])
def test_bad_batches_of_prompts_are_refused_clearly(model, prompts, options, error, message):
    options = {"max_new_tokens": 3, **options}
    with pytest.raises(error, match=message):
        generate(model, prompts, greedy=True, **options)


@pytest.mark.parametrize(("mask", "message"), [
    (torch.tensor([[1, 1, 0], [1, 1, 1]]), "must pad on the left"),
    (torch.tensor([[0, 0, 0], [1, 1, 1]]), "a row of zeros"),
    (torch.ones(2, 4), "must have the tokens' shape"),
])
def test_bad_attention_masks_are_refused_clearly(model, mask, message):
    with pytest.raises(ValueError, match=message):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 2, attention_mask=mask, greedy=True)


def test_compiled_generation_keeps_no_model_alive():
    model = GPT2(DECISIVE.replace(n_layer=1)).eval()
    model.generate(torch.randint(DECISIVE.vocab_size, (2, 5), generator=seeded(3)), 10,
                   greedy=True, compile=True)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_generation_of_the_same_sizes_reuses_the_last_cache(model, prompt):
    model.generate(prompt, 4, greedy=True)
    kept = generation._spare_caches[model]
    addresses = [tensor.data_ptr() for tensor in kept.keys]
    again = model.generate(prompt, 4, greedy=True)
    assert [tensor.data_ptr() for tensor in generation._spare_caches[model].keys] == addresses
    assert torch.equal(again, longhand_greedy(model, prompt, 4))  # nothing left from before


def test_an_attention_mask_of_ones_is_no_padding(model, prompt):
    mask = torch.ones_like(prompt)
    assert torch.equal(model.generate(prompt, 3, greedy=True, attention_mask=mask,
                                      use_cache=False), longhand_greedy(model, prompt, 3))
