import pytest
import torch

from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import cpu_decoding

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


@pytest.fixture(autouse=True)
def one_row_products_only_unless_asked(monkeypatch):
    """Compiled CPU decoding times one-row products only (packed products' autotuning compiles
    C++ for every product of every kind of model: minutes over the suite; the row kernel is
    built once per machine) except in the tests that ask for every way with the
    `every_product_way` fixture."""
    monkeypatch.setattr(cpu_decoding, "PRODUCT_WAYS", ("one_row_products",))


@pytest.fixture
def every_product_way(monkeypatch):
    """Every way of doing products timed by compiled CPU decoding, as outside the tests (its
    choices made afresh, and forgotten after the test)."""
    monkeypatch.setattr(cpu_decoding, "PRODUCT_WAYS", cpu_decoding.PRODUCTS)
    monkeypatch.setattr(cpu_decoding, "_choices", {})


@pytest.fixture(autouse=True)
def packed_products_tuned_against_aten_alone(monkeypatch):
    """Packed products choose among ATen's prepacked products only: inductor's C++ GEMM
    templates would cost half a minute of C++ compiling per kind of model, and what the tests
    check (the frozen, packed weights; the step's results; weights changed later) is the same."""
    monkeypatch.setattr(cpu_decoding, "PACKED",
                        cpu_decoding.PACKED | {"max_autotune_gemm_backends": "ATEN"})
