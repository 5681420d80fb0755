"""fastopt::grad_norm and fastopt.clip_grad_norm_ against torch: the norm against
torch.linalg.vector_norm of the concatenation in float64 (every dtype, mixed dtypes, dense
non-contiguous layouts, empty and zero-size tensors, thousands of tensors, norm types 2, 1, inf
and others, grad_scale, inf/NaN), on the CPU kernels (every instruction set) and the CUDA ones
(emulated on the CPU without a GPU); clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ (norm
and clipped grads, sparse grads, error_if_nonfinite, foreach, torch.compile); bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers.rng import generator

import fastopt

INF = float("inf")
NAN = float("nan")
NORM_TYPES = [2.0, 1.0, INF, 3.0, 0.5]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def grad_norm(tensors, norm_type=2.0, grad_scale=None) -> torch.Tensor:
    return torch.ops.fastopt.grad_norm(tensors, norm_type, grad_scale)


def reference_norm(tensors, norm_type) -> torch.Tensor:
    """The norm of the tensors' values, as float64, concatenated (torch's own norm, in float64)."""
    flat = [t.detach().to("cpu", torch.float64).flatten() for t in tensors]
    return torch.linalg.vector_norm(torch.cat(flat) if flat else torch.zeros(0), norm_type)


def assert_norm(result, tensors, norm_type, device, scale=1.0) -> None:
    """`result` is the norm of `tensors` divided by `scale`: float64 to 1e-12 if any tensor is
    float64, else float32 to its rounding (the kernels accumulate in float64)."""
    fp64 = any(t.dtype == torch.float64 for t in tensors)
    assert result.shape == ()
    assert result.dtype == (torch.float64 if fp64 else torch.float32)
    assert result.device.type == device
    expected = (reference_norm(tensors, norm_type) / scale).to(result.dtype)
    rtol = 1e-12 if fp64 else 2e-7
    torch.testing.assert_close(result.cpu(), expected, rtol=rtol, atol=0, equal_nan=True)


def odd_tensors(dtype, device, seed) -> list[torch.Tensor]:
    """Fresh random tensors of odd sizes and dense but non-contiguous layouts, and empty ones."""
    gen = generator(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    buffer = randn(1 + 4097)
    return [
        randn(1),
        randn(7),
        buffer[1:],  # at an odd offset: no 16-byte vector access on CUDA
        randn(9, 5).t(),
        randn(3, 5, 7, 4).to(memory_format=torch.channels_last),
        randn(0),
        randn(2, 0, 3),
        randn(70001),  # more than one CUDA chunk, several CPU blocks
    ]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(device, dtype, norm_type):
    tensors = odd_tensors(dtype, device, seed=1)
    assert_norm(grad_norm(tensors, norm_type), tensors, norm_type, device)


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_every_instruction_set(cpu_isa, norm_type):
    for dtype in DTYPES:
        tensors = odd_tensors(dtype, "cpu", seed=2)
        assert_norm(grad_norm(tensors, norm_type), tensors, norm_type, "cpu")


@pytest.mark.parametrize("with_fp64", [False, True])
def test_mixed_dtypes_in_one_call(device, with_fp64):
    gen = generator(3)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + [torch.float64] * with_fp64
    tensors = [
        torch.randn(1000 + 37 * i, generator=gen).to(device, d) for i, d in enumerate(dtypes)
    ]
    for norm_type in (2.0, INF):
        assert_norm(grad_norm(tensors, norm_type), tensors, norm_type, device)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_grad_scale_divides_and_changes_nothing(device, norm_type):
    tensors = odd_tensors(torch.float16, device, seed=4)
    before = [t.clone() for t in tensors]
    scale = torch.tensor([1024.0], device=device)
    assert_norm(grad_norm(tensors, norm_type, scale), tensors, norm_type, device, scale=1024.0)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b)
    assert scale.item() == 1024.0


def test_thousands_of_tensors(device):
    """More tensors and chunks than one CUDA launch takes, mixed dtypes."""
    gen = generator(5)
    sizes = torch.randint(0, 700, (3000,), generator=gen).tolist()
    tensors = [
        torch.randn(s, generator=gen).to(device, DTYPES[i % 3 * 2 % 4])  # fp32, bf16, fp32, ...
        for i, s in enumerate(sizes)
    ]
    for norm_type in (2.0, INF):
        assert_norm(grad_norm(tensors, norm_type), tensors, norm_type, device)


def test_a_tensor_across_launches(device):
    """254 small tensors, then one of 67 CUDA chunks: a launch takes 320 chunks at most, so the
    large tensor goes on in a second launch (from its slot 0)."""
    gen = generator(15)
    tensors = [torch.randn(3, generator=gen) for _ in range(254)]
    tensors.append(torch.randn(67 * 65536 + 5, generator=gen))
    tensors = [t.to(device) for t in tensors]
    for norm_type in (2.0, INF):
        assert_norm(grad_norm(tensors, norm_type), tensors, norm_type, device)


def test_one_large_tensor(device):
    """A tensor of many chunks and blocks (4M elements; 20M on the CPU, where a float32 sum would
    drift): the float64 accumulation keeps the float32 result within its rounding."""
    n = 20_000_003 if device == "cpu" else 4_000_003
    tensors = [torch.full((n,), 0.1, device=device)]
    exact = float(torch.tensor(0.1)) * math.sqrt(n)
    for norm_type, expected in ((2.0, exact), (1.0, float(torch.tensor(0.1)) * n)):
        result = grad_norm(tensors, norm_type)
        assert result.item() == pytest.approx(expected, rel=1e-7)
    gen = generator(6)
    tensors = [torch.randn(n // 4, generator=gen, dtype=torch.float64).to(device)]
    assert_norm(grad_norm(tensors), tensors, 2.0, device)


def test_independent_of_the_thread_count():
    """Each fixed block of elements is summed alike whichever thread takes it."""
    gen = generator(7)
    tensors = [torch.randn(s, generator=gen) for s in (3_000_001, 5, 200_000, 999_999)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append([grad_norm(tensors, p).item() for p in (2.0, 1.0, 3.0)])
    finally:
        torch.set_num_threads(threads)
    assert all(r == results[0] for r in results)


def test_empty_list_and_zero_size_tensors(device):
    result = grad_norm([], 2.0)
    assert result.item() == 0.0 and result.dtype == torch.float32 and result.device.type == "cpu"
    result = grad_norm([torch.zeros(0, device=device), torch.zeros(3, 0, device=device)], INF)
    assert result.item() == 0.0 and result.device.type == device


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0**70, 2.0**-80, 2.0**-45, 2.0**45])
def test_magnitudes_beyond_float32_sums(device, dtype, norm_type, scale):
    """The CPU kernel sums short float32 runs only where nothing is lost (squares of 2^70
    overflow float32, squares of 2^-80 vanish): tensors of such values, values of two magnitudes
    in one block, and all-zero blocks are still summed to float32 rounding."""
    gen = generator(11)
    scaled = torch.randn(2 * 4096 + 5, generator=gen) * scale
    mixed = torch.randn(2 * 4096, generator=gen)
    mixed[::977] *= scale  # a few scaled values inside otherwise ordinary blocks
    for tensors in ([scaled], [scaled[:300]], [mixed], [torch.zeros(2 * 4096 + 1), scaled]):
        tensors = [t.to(device, dtype) for t in tensors]
        assert_norm(grad_norm(tensors, norm_type), tensors, norm_type, device)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("special", [[INF], [-INF], [NAN], [INF, NAN], [NAN, -INF]])
def test_non_finite_values_propagate_as_torch(device, norm_type, special):
    gen = generator(8)
    tensors = [torch.randn(5000, generator=gen), torch.randn(33, generator=gen)]
    tensors[0][torch.randint(0, 5000, (len(special),), generator=gen)] = torch.tensor(special)
    tensors = [t.to(device) for t in tensors]
    result = grad_norm(tensors, norm_type)
    expected = reference_norm(tensors, norm_type).float()
    torch.testing.assert_close(result.cpu(), expected, equal_nan=True)


def test_traces_and_passes_opcheck():
    gen = generator(9)
    args = ([torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen).bfloat16()], 2.0)
    torch.library.opcheck(torch.ops.fastopt.grad_norm.default, (*args, torch.tensor([2.0])))
    torch.library.opcheck(torch.ops.fastopt.grad_norm.default, (*args, None))


# ---- bad input: the error names fastopt.grad_norm, the argument and the fix ---------------------


@pytest.mark.parametrize(
    ("tensors", "norm_type", "grad_scale", "message"),
    [
        ([torch.ones(3)], 0.0, None, "norm_type must be a number > 0 or inf"),
        ([torch.ones(3)], -2.0, None, "norm_type must be a number > 0 or inf"),
        ([torch.ones(3)], -INF, None, "norm_type must be a number > 0 or inf"),
        ([torch.ones(3)], NAN, None, "norm_type must be a number > 0 or inf"),
        ([], -1.0, None, "norm_type must be a number > 0 or inf"),
        ([torch.ones(3), torch.ones(2, dtype=torch.int64)], 2.0, None, r"tensors\[1\] has dtype"),
        ([torch.ones(3, dtype=torch.complex64)], 2.0, None, r"tensors\[0\] has dtype"),
        ([torch.ones(4, 4)[:, 1]], 2.0, None, r"tensors\[0\] is not stored densely"),
        ([torch.ones(3).to_sparse()], 2.0, None, r"tensors\[0\] has layout Sparse"),
        ([torch.ones(3), torch.ones(3, device="meta")], 2.0, None, r"tensors\[1\] is on meta"),
        ([torch.ones(3)], 2.0, torch.ones(2), "grad_scale must have one element"),
        ([torch.ones(3)], 2.0, torch.ones(1, dtype=torch.float64), "grad_scale must be float32"),
    ],
)
def test_bad_input_is_refused_by_name(tensors, norm_type, grad_scale, message):
    readable = [t.to_dense() if t.is_sparse else t for t in tensors if t.device.type == "cpu"]
    before = [t.clone() for t in readable]
    with pytest.raises(RuntimeError, match=f"fastopt.grad_norm: {message}"):
        grad_norm(tensors, norm_type, grad_scale)
    for t, b in zip(readable, before, strict=True):
        assert torch.equal(t, b)


def test_bad_input_on_cuda_kernels(device):
    """The CUDA kernels run the same checks."""
    with pytest.raises(RuntimeError, match=r"fastopt.grad_norm: tensors\[0\] has dtype"):
        grad_norm([torch.ones(3, dtype=torch.int32, device=device)])
    with pytest.raises(RuntimeError, match="fastopt.grad_norm: norm_type must be"):
        grad_norm([torch.ones(3, device=device)], -1.0)


# ---- fastopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ -----------------------------


def param_pairs(shapes, dtype, device, seed, without_grad=()) -> tuple[list, list]:
    """Two lists of params with equal grads (fresh random), for torch and for fastopt; the params
    at the indexes `without_grad` have none."""
    gen = generator(seed)
    pairs = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen).to(device, dtype)
        g = None if i in without_grad else torch.randn(shape, generator=gen).to(device, dtype)
        pair = [torch.nn.Parameter(p.clone()), torch.nn.Parameter(p.clone())]
        for q in pair:
            q.grad = None if g is None else g.clone()
        pairs.append(pair)
    return [a for a, _ in pairs], [b for _, b in pairs]


SHAPES = [(7,), (4097,), (9, 5), (3, 4, 5, 6), (1,), (0,)]


def clip_both(ref_params, fast_params, max_norm, norm_type=2.0, **options) -> None:
    """Clips with torch and with fastopt, and checks fastopt's norm and clipped grads against the
    exact (float64) clipping of the same grads: within torch's own error of it, or within the
    rounding of their dtype. (torch takes the norm of each dtype's grads in that dtype, so its
    norm of bfloat16 grads is off by bfloat16's rounding; fastopt's has float32's.)"""
    ref_list, fast_list = (
        [p] if isinstance(p, torch.Tensor) else p for p in (ref_params, fast_params)
    )
    grads = [None if p.grad is None else p.grad.to(torch.float64, copy=True) for p in fast_list]
    exact_norm = reference_norm([g for g in grads if g is not None], norm_type).item()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type, **options)
    fast_norm = fastopt.clip_grad_norm_(fast_params, max_norm, norm_type, **options)
    assert fast_norm.dtype == ref_norm.dtype and fast_norm.device == ref_norm.device
    if not math.isfinite(exact_norm):
        torch.testing.assert_close(fast_norm, ref_norm, equal_nan=True)
        for r, f in zip(ref_list, fast_list, strict=True):
            torch.testing.assert_close(f.grad, r.grad, equal_nan=True)
        return
    torch_error = abs(ref_norm.item() - exact_norm) / exact_norm
    rounding = 2 * torch.finfo(ref_norm.dtype).eps if ref_norm.dtype != torch.float64 else 1e-12
    assert abs(fast_norm.item() - exact_norm) <= (torch_error + rounding) * exact_norm
    coefficient = min(max_norm / (exact_norm + 1e-6), 1.0)
    for g, f in zip(grads, fast_list, strict=True):
        assert (g is None) == (f.grad is None)
        if g is not None:
            eps = torch.finfo(f.grad.dtype).eps if f.grad.dtype != torch.float64 else 1e-13
            expected = (g * coefficient).to(f.grad.dtype)
            tol = 4 * eps + (0 if f.grad.dtype == ref_norm.dtype else torch_error)
            torch.testing.assert_close(f.grad, expected, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(device, dtype, norm_type, max_norm):
    # torch refuses the inf-norm of an empty tensor (no identity for its max); fastopt skips it.
    shapes = SHAPES[:-1] if norm_type == INF else SHAPES
    ref_params, fast_params = param_pairs(shapes, dtype, device, seed=10, without_grad=(2,))
    clip_both(ref_params, fast_params, max_norm, norm_type)


@pytest.mark.parametrize("foreach", [None, False, True])
def test_clip_grad_norm_mixed_dtypes_single_tensor_and_foreach(foreach):
    ref_params, fast_params = param_pairs(SHAPES, torch.float32, "cpu", seed=11)
    for params in (ref_params, fast_params):
        params[1].data, params[1].grad = params[1].data.bfloat16(), params[1].grad.bfloat16()
    clip_both(ref_params, fast_params, 0.3, foreach=foreach)
    clip_both(ref_params[1], fast_params[1], 0.01, 3.0, foreach=foreach)


def test_clip_grad_norm_without_grads():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert torch.equal(fastopt.clip_grad_norm_(params, 1.0), torch.tensor(0.0))
    with pytest.warns(UserWarning, match="empty generator"):
        assert fastopt.clip_grad_norm_((p for p in []), 1.0).item() == 0.0


def test_clip_grad_norm_sparse_grads():
    """A sparse COO grad with repeated indices (nn.Embedding(sparse=True)) beside dense ones."""
    models = []
    for _ in range(2):
        torch.manual_seed(12)
        models.append(
            torch.nn.ModuleList([torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 2)])
        )
    for embedding, linear in models:
        linear(embedding(torch.tensor([1, 2, 1, 7]))).sum().backward()
        assert embedding.weight.grad.is_sparse and not embedding.weight.grad.is_coalesced()
    ref_params, fast_params = (list(m.parameters()) for m in models)
    ref = torch.nn.utils.clip_grad_norm_(ref_params, 0.1)
    fast = fastopt.clip_grad_norm_(fast_params, 0.1)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=0)
    for r, f in zip(ref_params, fast_params, strict=True):
        torch.testing.assert_close(f.grad.to_dense(), r.grad.to_dense(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("special", [INF, NAN])
def test_clip_grad_norm_non_finite(device, special):
    ref_params, fast_params = param_pairs(SHAPES, torch.float32, device, seed=13)
    for params in (ref_params, fast_params):
        params[1].grad[5] = special
    before = [p.grad.clone() for p in fast_params]
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        fastopt.clip_grad_norm_(fast_params, 1.0, error_if_nonfinite=True)
    for p, b in zip(fast_params, before, strict=True):
        assert torch.equal(p.grad, b) or bool(((p.grad == b) | (p.grad.isnan() & b.isnan())).all())
    clip_both(ref_params, fast_params, 1.0)


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_clip_grad_norm_compiles(norm_type):
    """torch.compile(fullgraph=True) traces it (through the op's meta kernel) and matches eager."""
    torch._dynamo.reset()
    eager_params, compiled_params = param_pairs(SHAPES, torch.float32, "cpu", seed=14)
    compiled = torch.compile(fastopt.clip_grad_norm_, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes
        compiled_norm = compiled(compiled_params, 0.5, norm_type)
    eager_norm = fastopt.clip_grad_norm_(eager_params, 0.5, norm_type)
    assert torch.equal(compiled_norm, eager_norm)
    for e, c in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-6, atol=0)
