import argparse
import statistics
import time

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from gpt2_decl import GPT2, GPT2Config, bench, bench_generate, count_parameters, typechecked
from gpt2_decl.cli import main
from gpt2_decl.cli.generate import stream_text
from gpt2_decl.generation import generate, sample, stream
from gpt2_decl.kv_cache import KVCache
from gpt2_decl.tokenizer import GPT2Tokenizer

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


def test_inductor_batch_1_decode_equals_eager_uncached():
    # Batch 1 on a CPU takes the compiled one-row path: multiply-and-sum linears.
    model = GPT2(DECISIVE.replace(n_layer=1)).eval()
    prompt = torch.randint(DECISIVE.vocab_size, (1, 5), generator=seeded(9))
    assert torch.equal(
        model.generate(prompt, 10, greedy=True, compile=True), longhand_greedy(model, prompt, 10)
    )


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


def test_decode_benchmark_reports_every_way_of_decoding_against_the_bound():
    args = argparse.Namespace(
        device="cpu", dtype="float32", checkpoint=None, preset="small", n_layer=1, n_head=2,
        d_model=32, seed=0, prompt_len=4, new_tokens=3, runs=1, warmup=0, compare_dtype=None,
    )
    report = bench_generate.run(args)
    config = GPT2Config.from_preset("small", n_layer=1, n_head=2, d_model=32)
    weight_bytes = count_parameters(config).without_position_embedding * 4  # float32
    assert report["weight_bytes_per_token"] == weight_bytes
    assert report["bound_tokens_per_s"] == report["copy_bandwidth_bytes_per_s"] / weight_bytes
    # One measurement before the first run, and one after every run (one run per row).
    bandwidths = report["copy_bandwidths_bytes_per_s"]
    assert len(bandwidths) == 1 + len(report["rows"])
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "eager, cache", "compiled, cache", "eager, no cache", "compiled, no cache",
        "transformers generate",
    ]
    for index, row in enumerate(report["rows"]):
        assert row["same_tokens"], row["name"]  # transformers' tokens too: the same weights
        assert row["tokens_per_s"] == pytest.approx(3 / (row["median_ms"] / 1e3))
        # The run's bound: the better bandwidth of the measurements just before and after it.
        bound = max(bandwidths[index], bandwidths[index + 1]) / weight_bytes
        assert row["bound_tokens_per_s"] == pytest.approx(bound)
        assert row["bound_fraction"] == pytest.approx(row["tokens_per_s"] / bound)
        # Only the cached ways stream their tokens for the paired measurement, once per run.
        paired = row["run_paired_bound_fractions"]
        if row["name"].endswith(", cache"):
            assert len(paired) == 1 and paired[0] > 0
            assert row["paired_bound_fraction"] == paired[0]
        else:
            assert paired == [] and row["paired_bound_fraction"] is None


def test_decode_benchmark_compares_dtypes_run_by_run(capsys):
    args = argparse.Namespace(
        device="cpu", dtype="float32", checkpoint=None, preset="small", n_layer=1, n_head=2,
        d_model=32, seed=0, prompt_len=4, new_tokens=3, runs=2, warmup=0,
        compare_dtype="bfloat16",
    )
    report = bench_generate.run(args)
    rows = {row["name"]: row for row in report["rows"]}
    ratios = report["compare_dtype_speed_ratios"]
    measured = report["copy_bandwidths_bytes_per_s"]
    around = [max(pair) for pair in zip(measured, measured[1:], strict=False)]
    for name in ("eager, cache", "compiled, cache"):
        ours, other = rows[name], rows[f"{name}, bfloat16"]
        # Each run's bound: the better of the bandwidths measured around it over the bytes read,
        # which the bfloat16 copy halves.
        weight_bytes = report["weight_bytes_per_token"]
        for row, row_bytes in ((ours, weight_bytes), (other, weight_bytes // 2)):
            for bound in row["run_bounds_tokens_per_s"]:
                assert any(bound * row_bytes == pytest.approx(best) for best in around)
        turns = zip(other["run_tokens_per_s"], ours["run_tokens_per_s"], strict=True)
        assert ratios[name] == pytest.approx(statistics.median(a / b for a, b in turns))
        # At equal memory speed: the paired shares, over bytes read that bfloat16 halves.
        paired_ratio = report["compare_dtype_paired_speed_ratios"][name]
        shares = other["paired_bound_fraction"] / ours["paired_bound_fraction"]
        assert paired_ratio == pytest.approx(shares * 2)
    assert "bfloat16 / float32, compiled, cache:" in capsys.readouterr().out


def test_paired_share_is_the_copies_time_over_the_tokens_time(monkeypatch):
    token_s, copy_s, new_tokens = 0.02, 0.005, 4

    def slow_tokens(prompt, new):
        for _ in range(new):
            time.sleep(token_s)
            yield torch.zeros(1, dtype=torch.long)

    copies_timed = []
    monkeypatch.setattr(
        bench_generate.StepCopies, "seconds", lambda self: copies_timed.append(1) or copy_s
    )
    way = bench_generate.Decoder(
        "fake", None, 1, 1024, torch.float32, stream=slow_tokens
    )
    share = bench_generate.paired_bound_fraction(
        way, torch.zeros(1, 1, dtype=torch.long), new_tokens, torch.device("cpu")
    )
    assert len(copies_timed) == new_tokens  # one copy between every two tokens, and after the last
    # Sleeping overshoots a little, never undershoots: the share is at most 0.005 / 0.02.
    assert 0.2 < share <= copy_s / token_s


def test_speed_ratio_at_equal_memory_speed_from_paired_shares():
    def row(name, paired_fraction):
        timing = bench.Timing(1.0, 1.0, 1.0, 1)
        return bench_generate.DecodeRow(
            name, timing, 1, 0.0, (1.0,), (1.0,), True, (paired_fraction,)
        )

    rows = [
        row("eager, cache", 0.5), row("compiled, cache", 0.8),
        row("eager, cache, bfloat16", 0.5), row("compiled, cache, bfloat16", 0.6),
    ]
    weight_bytes = {
        "eager, cache": 400, "compiled, cache": 400,
        "eager, cache, bfloat16": 200, "compiled, cache, bfloat16": 200,
    }
    ratios = bench_generate.paired_speed_ratios(rows, "bfloat16", weight_bytes)
    # tokens/s = share x bandwidth / bytes: (0.6 / 200) / (0.8 / 400) = 1.5, and 2 for eager.
    assert ratios == {"eager, cache": pytest.approx(2.0), "compiled, cache": pytest.approx(1.5)}


def test_decode_benchmark_refuses_to_compare_a_dtype_with_itself(capsys):
    with pytest.raises(SystemExit, match="--compare-dtype float32 is already --dtype"):
        main(["bench", "--generate", "--dtype", "float32", "--compare-dtype", "float32"])
