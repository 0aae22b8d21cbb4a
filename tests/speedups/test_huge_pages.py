import re
from pathlib import Path

import pytest
import torch

from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import huge_pages

TINY = GPT2Config(n_layer=2, n_head=2, d_model=32, vocab_size=101, n_ctx=16)
needs_huge_pages = pytest.mark.skipif(
    not huge_pages.available(), reason="no transparent huge pages on this system"
)


def huge_page_kib_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from the kernel's own accounting."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        bounds = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if bounds:
            mapping = range(int(bounds[1], 16), int(bounds[2], 16))
        elif line.startswith("AnonHugePages:") and address in mapping:
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds address {address:#x}")


@needs_huge_pages
def test_moved_parameters_keep_their_values_objects_and_ties():
    model = GPT2(TINY)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    assert huge_pages.move_parameters(model)
    assert all(moved is kept for moved, kept in zip(model.parameters(), parameters, strict=True))
    assert model.lm_head.weight is model.token_embedding.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert model.token_embedding.weight.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0


@needs_huge_pages
def test_the_kernel_backs_moved_parameters_with_huge_pages():
    # An 8 MiB token embedding: huge pages wherever it starts.
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=1024, vocab_size=2048, n_ctx=16))
    assert huge_pages.move_parameters(model)
    assert huge_page_kib_at(model.token_embedding.weight.data_ptr()) >= 2048


@needs_huge_pages
def test_moving_is_done_once_and_again_after_the_parameters_move_elsewhere():
    model = GPT2(TINY)
    assert huge_pages.move_parameters(model)
    assert not huge_pages.move_parameters(model)
    model.to(torch.bfloat16)
    assert huge_pages.move_parameters(model)


@needs_huge_pages
def test_moved_parameters_still_save_and_load(tmp_path):
    model = GPT2(TINY)
    huge_pages.move_parameters(model)
    model.save_pretrained(tmp_path)  # safetensors refuses tensors that share a storage
    loaded = GPT2.from_pretrained(tmp_path)
    tokens = torch.randint(TINY.vocab_size, (1, 5))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_nothing_moves_without_huge_pages_or_off_the_cpu(monkeypatch, tmp_path):
    with torch.device("meta"):
        assert not huge_pages.move_parameters(GPT2(TINY))
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    assert not huge_pages.available()
    model = GPT2(TINY)
    address = model.token_embedding.weight.data_ptr()
    assert not huge_pages.move_parameters(model)
    assert model.token_embedding.weight.data_ptr() == address
    with pytest.raises(RuntimeError, match="no transparent huge pages"):
        huge_pages.empty(1024)


@needs_huge_pages
def test_moved_weights_decode_the_same_tokens():
    model = GPT2(TINY).eval()
    prompt = torch.randint(TINY.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    expected = model.generate(prompt, 5, greedy=True)
    assert huge_pages.move_parameters(model)
    assert torch.equal(model.generate(prompt, 5, greedy=True, compile=True), expected)


@needs_huge_pages
def test_empty_parameters_stay_and_the_others_move():
    module = torch.nn.Linear(4, 3)
    module.nothing = torch.nn.Parameter(torch.zeros(0))
    weight = module.weight.detach().clone()
    assert huge_pages.move_parameters(module)
    assert module.weight.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    assert torch.equal(module.weight, weight) and module.nothing.numel() == 0


@needs_huge_pages
def test_empty_starts_on_a_huge_page():
    tensor = huge_pages.empty(3 * huge_pages.HUGE_PAGE_BYTES + 5)
    assert tensor.dtype == torch.uint8 and tensor.numel() == 3 * huge_pages.HUGE_PAGE_BYTES + 5
    assert tensor.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    tensor.fill_(7)
    assert huge_page_kib_at(tensor.data_ptr()) >= 2048
