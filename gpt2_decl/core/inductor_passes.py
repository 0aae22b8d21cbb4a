"""Passes over inductor's graphs that every compile of this project's runs: fixes of what
inductor's output would otherwise get wrong (`compiling.inductor_options` adds them)."""

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


@torch.library.custom_op("gpt2_decl::int_mm", mutates_args=())
def dense_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """`torch._int_mm(a, b)` with any stride 0 of a size-1 axis made that axis's extent.

    A single row's input reaches the product from inductor with a row stride of 0 (any stride
    is right for an axis of size 1), which the CPU's integer product misreads (oneDNN, where the
    CPU has AMX): every sum comes out wrong. A view with the other stride reads the same bytes.
    """
    return torch._int_mm(_size_one_axes_strided(a), _size_one_axes_strided(b))


@dense_int_mm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


def _size_one_axes_strided(t: Tensor) -> Tensor:
    if not any(size == 1 and stride == 0 for size, stride in zip(t.shape, t.stride(),
                                                                 strict=True)):
        return t
    extent = max([size * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)
                  if size != 1] + [1])
    strides = [extent if size == 1 and stride == 0 else stride
               for size, stride in zip(t.shape, t.stride(), strict=True)]
    return t.as_strided(t.shape, strides)


class DenseIntProducts(CustomGraphPass):
    """Inductor's post-grad pass that makes each integer product on the CPU
    (`aten._int_mm`, torchao's int8-dynamic layers) a `dense_int_mm`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            value = node.meta.get("val")
            if node.target is torch.ops.aten._int_mm.default \
                    and isinstance(value, Tensor) and value.device.type == "cpu":
                node.target = torch.ops.gpt2_decl.int_mm.default

    def uuid(self) -> str:
        return get_hash_for_files((__file__,))


DENSE_INT_PRODUCTS = DenseIntProducts()
