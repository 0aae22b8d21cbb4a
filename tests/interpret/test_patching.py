"""Activation patching sweeps, batched, against the same patches made one at a time; attribution
patching against gradients taken by hand; the pictures."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config, Patch
from gpt2_decl.cli import main
from gpt2_decl.interpret import attribution_patching, patch_sweep, pictures
from gpt2_decl.interpret.pictures import LogitLens, draw_attention, draw_logit_lens

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, seed=3,
                    init_std=0.2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model():
    return GPT2(CONFIG).eval()


@pytest.fixture
def prompts():
    clean = torch.randint(97, (1, 7), generator=torch.Generator().manual_seed(4))
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 5) % 97
    return clean, corrupted


def logit_difference(logits):
    return logits[:, -1, 11] - logits[:, -1, 12]


def test_a_position_sweep_equals_the_same_patches_one_at_a_time(model, prompts):
    clean, corrupted = prompts
    swept = patch_sweep(model, clean, corrupted, "resid_pre", logit_difference, batch=5)
    assert swept.shape == (2, 7)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, "blocks.*.resid_pre")
        for layer in range(2):
            for position in range(7):
                name = f"blocks.{layer}.resid_pre"
                alone = model.run_with_patches(corrupted, {
                    name: Patch(cache[name], positions=[position])})
                assert torch.allclose(swept[layer, position], logit_difference(alone)[0],
                                      atol=1e-5)
    # The first block's input at the corrupted position is all that differs there.
    with torch.no_grad():
        clean_metric = logit_difference(model(clean))[0]
    assert torch.allclose(swept[0, 2], clean_metric, atol=1e-5)


def test_a_head_sweep_compiled_equals_the_same_patches_one_at_a_time(model, prompts):
    clean, corrupted = prompts
    counter = CompileCounter()
    swept = patch_sweep(model, clean, corrupted, "z", logit_difference, per="head", batch=3,
                        runner=gpt2_decl.compile(model, backend=counter))
    # One graph captures the clean run; one runs all three batches of patched runs.
    assert swept.shape == (2, 4) and counter.frame_count == 2
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, "blocks.*.z")
        for layer in range(2):
            for head in range(4):
                name = f"blocks.{layer}.z"
                alone = model.run_with_patches(corrupted, {name: Patch(cache[name],
                                                                       heads=[head])})
                assert torch.allclose(swept[layer, head], logit_difference(alone)[0],
                                      atol=1e-4)


def test_attribution_patching_is_the_difference_times_the_gradient(model, prompts):
    clean, corrupted = prompts
    estimate = attribution_patching(model, clean, corrupted, "resid_post", logit_difference)
    assert estimate.shape == (2, 7)
    # By hand for the last block: the metric as a function of its output, through the final
    # LayerNorm and the unembedding.
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, "blocks.1.resid_post")
        _, corrupted_cache = model.run_with_cache(corrupted, "blocks.1.resid_post")
    resid = corrupted_cache["blocks.1.resid_post"].clone().requires_grad_()
    normed = torch.nn.functional.layer_norm(resid, (48,), model.ln_f.weight, model.ln_f.bias)
    logit_difference(normed @ model.token_embedding.weight.T).sum().backward()
    by_hand = ((clean_cache["blocks.1.resid_post"] - resid.detach()) * resid.grad).sum(-1)[0]
    assert torch.allclose(estimate[1], by_hand, atol=1e-5)


def test_attribution_patching_of_scores_is_zero_where_the_runs_agree(model, prompts):
    clean, corrupted = prompts  # they differ at position 2 only
    estimate = attribution_patching(model, clean, corrupted, "scores", logit_difference)
    assert estimate.shape == (2, 4, 7) and estimate.isfinite().all()
    # Queries before the corrupted token see the same keys in both runs.
    assert (estimate[:, :, :2] == 0).all() and (estimate[:, :, 2:] != 0).any()


def test_bad_sweeps_are_refused_in_one_line(model, prompts):
    clean, corrupted = prompts
    with pytest.raises(ValueError, match="per='head' needs a site with a head axis"):
        patch_sweep(model, clean, corrupted, "resid_pre", logit_difference, per="head")
    with pytest.raises(ValueError, match="two \\[1, seq\\] prompts of one length"):
        patch_sweep(model, clean, corrupted[:, :5], "resid_pre", logit_difference)
    with pytest.raises(ValueError, match="no activation is named 'blocks.\\*.resid'"):
        patch_sweep(model, clean, corrupted, "resid", logit_difference)
    with pytest.raises(ValueError, match="two \\[1, seq\\] prompts of one length"):
        attribution_patching(model, clean.expand(2, 7), corrupted.expand(2, 7), "resid_post",
                             logit_difference)


def test_inspect_draws_the_patterns_and_the_logit_lens(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    GPT2(GPT2Config(n_ctx=64, d_model=32, n_layer=2, n_head=2)).eval().save_pretrained(checkpoint)
    # Dollar signs are text, not matplotlib's mathematics.
    main(["inspect", "--checkpoint", str(checkpoint), "--prompt", "Hello $$x_1$$ world, $hello",
          "--layer", "1", "--out", str(tmp_path / "pictures"), "--device", "cpu"])
    out = capsys.readouterr().out
    for name in ("attention-block-1.png", "logit-lens.png"):
        path = tmp_path / "pictures" / name
        assert f"wrote {path}" in out and path.read_bytes().startswith(PNG_SIGNATURE)
    assert not (tmp_path / "pictures" / "attention-block-0.png").exists()
    with pytest.raises(SystemExit, match="--layer 2: the model has blocks 0 to 1"):
        main(["inspect", "--checkpoint", str(checkpoint), "--prompt", "Hi", "--layer", "2"])


def png_size(path):
    header = path.read_bytes()[:24]  # the signature, then the IHDR chunk: width, height
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_pictures_of_a_long_prompt_stay_a_size_that_can_be_drawn(tmp_path, monkeypatch):
    save = pictures._save
    seq = 120
    labels = [f"t{i}" for i in range(seq)]
    pattern = torch.rand(4, seq, seq).softmax(-1)
    # 110 dots per inch: four panels of at most 10 inches side by side.
    width, height = png_size(draw_attention(pattern, labels, tmp_path / "a.png", "a"))
    assert width <= 4400 and height <= 1166
    lens = LogitLens(torch.randint(97, (3, seq)), torch.rand(3, seq))
    drawn = []
    monkeypatch.setattr(pictures, "_save", lambda figure, path: drawn.append(figure) or
                        save(figure, path))
    width, _ = png_size(draw_logit_lens(lens, labels, str, tmp_path / "lens.png", "lens"))
    assert width <= (0.9 * 40 + 1.5) * 110
    shown = [label.get_text() for label in drawn[0].axes[0].get_xticklabels()]
    assert shown == labels[-40:]  # the last 40 positions
