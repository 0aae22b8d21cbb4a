"""Devices named by the user: what this machine has, and what a GPU can compute in."""

import pytest
import torch

from gpt2_decl.cli.common import resolve_dtype
from gpt2_decl.core.devices import check_dtype_supported, resolve_device


@pytest.fixture
def gpu_without_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-16GB")
    return torch.device("cuda", 0)


def test_bfloat16_on_a_gpu_without_it_is_refused_naming_the_gpu(gpu_without_bfloat16):
    with pytest.raises(ValueError, match=r"^Tesla V100-SXM2-16GB \(cuda:0\) does not support "
                       r"bfloat16; use --dtype float32$"):
        check_dtype_supported(torch.bfloat16, gpu_without_bfloat16)
    check_dtype_supported(torch.float32, gpu_without_bfloat16)  # float32 is fine
    with pytest.raises(SystemExit) as exited:
        resolve_dtype("bfloat16", gpu_without_bfloat16)
    assert "does not support bfloat16" in str(exited.value.code)
    assert "\n" not in str(exited.value.code)


@pytest.mark.parametrize(("name", "message"), [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:7" if not torch.cuda.is_available() else "cuda:99", "cuda"),
])
def test_devices_that_are_not_here_are_refused_in_one_line(name, message):
    with pytest.raises(ValueError, match=message) as raised:
        resolve_device(name)
    assert "\n" not in str(raised.value)
