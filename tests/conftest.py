import pytest
import torch

from gpt2_decl import GPT2, GPT2Config

TINY = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, seed=1)


@pytest.fixture
def tiny_config() -> GPT2Config:
    return TINY


@pytest.fixture
def tiny_model() -> GPT2:
    return GPT2(TINY).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(TINY.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles afresh: graphs compiled by earlier tests (other models, other dtypes)
    neither serve it nor count against Dynamo's per-function recompile limit."""
    torch._dynamo.reset()
    yield
