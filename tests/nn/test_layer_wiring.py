"""How the two layers are wired, the same way for both: the CUDA (Triton) kernels registered
lazily, the argument checks of _library.py run on the CPU path too (naming fastopt.<op>, the
argument and the fix) while the C++ kernels still refuse bad input on a direct torch.ops call,
the packed layout's constants agreeing with C++, and filter_fn(module, fqn) in both model-wide
helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers.rng import generator
from torch import nn

import fastopt.functional as F
from fastopt import _extension, _library
from fastopt.functional import _layers
from fastopt.nn import BlockSparseLinear, Int8Linear, quantize_, sparsify_

LAYER_OPS = [
    "int8_mm",
    "int8_linear",
    "blocksparse_linear",
    "blocksparse_linear_grad_input",
    "blocksparse_linear_grad_values",
]


def test_packed_layout_constants_match_the_kernels():
    module = _extension.cpu_module()
    assert _library.INT8_BLOCK_N == module.INT8_BLOCK_N
    assert _library.INT8_GROUP_K == module.INT8_GROUP_K
    assert _library.INT8_MAX_IN_FEATURES == module.INT8_MAX_IN_FEATURES


@pytest.mark.parametrize("op", LAYER_OPS)
def test_every_layer_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CUDA")


def test_import_fastopt_does_not_import_triton():
    """Both layers register their Triton kernels lazily."""
    code = "import sys, fastopt, fastopt.nn; print('triton' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


def test_missing_triton_kernels_name_the_op():
    with pytest.raises(RuntimeError, match=r"^fastopt\.int8_linear: no fastopt kernels for cuda"):
        _layers.require_kernels(torch.device("cuda"), "int8_linear", "no_such_module")


def _int8_args(k: int = 37, n: int = 21):
    torch.manual_seed(0)
    q = Int8Linear.from_float(nn.Linear(k, n))
    return q, (q.packed_weight, q.weight_compensation, k, q.weight_scale, q.bias, q.input_scale)


def test_int8_bad_input_gets_the_friendly_check_on_the_cpu():
    _, args = _int8_args()
    x = torch.randn(2, 36, generator=generator(1))
    message = r"^fastopt\.int8_linear: input has 36 features .* pass an input of shape \[\.\.\., 37"
    with pytest.raises(RuntimeError, match=message):
        F.int8_linear(x, *args[:4], args[4])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": torch.randn(2, 36)}, "input, in_features and packed_weight disagree"),
        ({"weight_scale": torch.ones(20)}, r"weight_scale must be a float32 \[N\] CPU tensor"),
        ({"bias": torch.ones(21, dtype=torch.float64)}, "bias must be an"),
        ({"input_scale": torch.ones(36)}, r"input_scale must be a float32 \[K\]"),
        ({"input": torch.ones(2, 37, dtype=torch.int32)}, "input must be float32"),
    ],
    ids=["features", "weight_scale", "bias", "input_scale", "dtype"],
)
def test_int8_direct_op_call_still_fails_safely(change, message):
    """torch.ops.fastopt.int8_linear called directly skips the Python checks; the kernel's own
    refuse what would read out of bounds."""
    _, (packed, compensation, k, weight_scale, bias, input_scale) = _int8_args()
    args = {
        "input": torch.randn(2, k),
        "weight_scale": weight_scale,
        "bias": bias,
        "input_scale": torch.ones(k),
    } | change
    with pytest.raises(RuntimeError, match=rf"^fastopt\.int8_linear: {message}"):
        torch.ops.fastopt.int8_linear(
            args["input"], packed, compensation, k, args["weight_scale"], args["bias"],
            args["input_scale"], True,
        )  # fmt: skip


def test_blocksparse_bad_input_gets_the_friendly_check_on_the_cpu():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    x = torch.randn(3, 64, dtype=torch.float16)
    values = layer.values.detach().half()
    message = (
        r"^fastopt\.blocksparse_linear: values is torch\.float16, but the cpu kernels take "
        r"float32, bfloat16 or float64; convert it with \.to\(torch\.float32\)"
    )
    with pytest.raises(RuntimeError, match=message):
        F.blocksparse_linear(x, values, layer.index)
    with pytest.raises(RuntimeError, match=r"^fastopt\.blocksparse_linear: values is Half"):
        torch.ops.fastopt.blocksparse_linear(x, values, None, *layer.index)


def test_blocksparse_block_size_the_cpu_lacks():
    """Block size 128 runs on CUDA only: the CPU path says so before the kernel."""
    layer = BlockSparseLinear(128, 128, block_size=128, density=1.0)
    message = r"^fastopt\.blocksparse_linear: the cpu kernels take block sizes 16, 32, 64, got 128"
    with pytest.raises(RuntimeError, match=message):
        layer(torch.randn(2, 128))


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    )


@pytest.mark.parametrize(
    ("convert", "layer_type"),
    [
        (lambda model, f: sparsify_(model, block_size=16, density=0.5, filter_fn=f),
         BlockSparseLinear),
        (lambda model, f: quantize_(model, filter_fn=f), Int8Linear),
    ],
    ids=["sparsify_", "quantize_"],
)  # fmt: skip
def test_filter_fn_takes_module_then_fqn(convert, layer_type):
    """torchao's convention in both helpers: filter_fn(module, fully qualified name)."""
    model = _model()
    calls = []

    def filter_fn(module, fqn):
        calls.append((type(module), fqn))
        return fqn != "2.0"

    convert(model, filter_fn)
    assert calls == [(nn.Linear, "0"), (nn.Linear, "2.0"), (nn.Linear, "2.1")]
    assert isinstance(model[0], layer_type) and isinstance(model[2][1], layer_type)
    assert type(model[2][0]) is nn.Linear
