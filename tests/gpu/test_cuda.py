"""FusedAdam on CUDA against torch.optim.Adam / AdamW(foreach=False) on CUDA: every option, fp32 /
fp64 / bf16 / fp16, thousands of tensors (several kernel launches), a 10M element tensor, CUDA
graph capture, and bad input. Skipped without a GPU.

The tests that run on both devices (checkpoints, GradScaler, mixed dtypes) are in the files of
their subject, with a `device` parameter."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.against_torch import run_against_torch
from helpers.cuda import ON_CUDA, checked_cuda
from helpers.optim_cases import ADAM_OPTIONS, RICH, SHAPES
from helpers.optim_compare import assert_matches_reference, rounding_noise, step_and_compare
from helpers.optim_pairs import fp64_twin, make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.snapshot import assert_unchanged, snapshot
from helpers.tolerances import FP32

import fastopt

pytestmark = ON_CUDA

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _checked_cuda():
    with checked_cuda():
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_matches_torch_on_cuda(dtype, name, options):
    """Tensor lr on the device; params and every state tensor compared after every step."""
    run_against_torch(name, dtype, options, seed=1, steps=10, device=CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_on_cuda(dtype, name, amsgrad):
    options = dict(amsgrad=amsgrad, maximize=False, weight_decay=0.1)
    run_against_torch(name, dtype, options, seed=2, device=CUDA)


@pytest.mark.parametrize("lr_device", ["cpu", CUDA])
def test_tensor_lr_on_either_device(lr_device):
    ref_params, fast_params = make_param_pairs(SHAPES, device=CUDA, seed=3)
    lr = torch.tensor(0.01, device=lr_device)
    ref, fast = optimizer_pair("AdamW", ref_params, fast_params, lr=lr, amsgrad=True)
    step_and_compare(ref, fast, ref_params, fast_params, generator(4), 5)


def test_unaligned_and_non_contiguous_params_on_cuda():
    """Params at odd offsets (no 16-byte vector access possible) next to aligned ones, plus a
    transposed and a channels_last param."""
    gen = generator(5)
    buffer = torch.randn(1 + 4097 + 33, generator=gen, device="cpu").to(CUDA)
    views = [buffer[1 : 1 + 4097], buffer[1 + 4097 :]]
    starts = [
        *views,
        torch.randn(9, 5, generator=gen).to(CUDA).t(),
        torch.randn(4, 3, 5, 7, generator=gen).to(CUDA).to(memory_format=torch.channels_last),
        torch.randn(4099, generator=gen).to(CUDA),
    ]
    fast_params = [s.detach().requires_grad_() for s in starts]  # the first two share `buffer`
    ref_params = [s.clone(memory_format=torch.preserve_format).requires_grad_() for s in starts]
    assert fast_params[0].data_ptr() % 16 != 0
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=0.01, amsgrad=True)
    step_and_compare(ref, fast, ref_params, fast_params, gen, 4)


# With RICH's weight_decay, among millions of elements some have grad + weight_decay * param
# within a few ulps of 0, and their step (RMSprop's ~ lr * sign, near eps; Adam's cancellation)
# or acc_delta (~ its square) hinges on how that sum rounded, in torch as in fastopt: the large
# tests below therefore judge fastopt against torch's own rounding noise, measured by an fp64
# twin of torch's run (`step_and_compare(exact=...)`), not by rtol alone.
def thousands_of_tensors(name: str, device: str) -> None:
    """1500 tensors of assorted sizes (and some without grads on some steps, so the step counts
    differ between tensors of one launch), within twice torch's own rounding noise of torch."""
    gen = generator(7)
    sizes = torch.randint(0, 5000, (1500,), generator=gen).tolist()
    shapes = [(s,) if i % 4 else (max(1, s // 9), 9) for i, s in enumerate(sizes)]
    ref_params, fast_params = make_param_pairs(shapes, device=device, seed=8)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    exact, exact_params = fp64_twin(name, ref_params, **RICH[name])
    for step in range(5):
        active = slice(None) if step % 2 == 0 else slice(None, None, 3)
        for p in (*ref_params, *fast_params, *exact_params):
            p.grad = None
        grads = set_grads(gen, ref_params[active], fast_params[active])
        for p, g in zip(exact_params[active], grads, strict=True):
            p.grad = g.double()
        ref.step()
        fast.step()
        exact.step()
        noise = rounding_noise(ref, ref_params, exact, exact_params)
        assert_matches_reference(
            ref, fast, ref_params, fast_params, **FP32, where=f"step {step}", flat=True, noise=noise
        )
    counts = {fast.state[p]["step"].item() for p in fast_params}
    assert counts == {3.0, 5.0}  # every third param stepped 5 times, the others 3


def ten_million_elements(name: str, device: str) -> None:
    """A 10M element tensor after 18 tensors of 11 chunks (of 65536 elements) each: one launch
    holds 320 chunks, so the big tensor starts in one launch and ends in the next. Within twice
    torch's own rounding noise of torch (weight_decay included)."""
    shapes = [(10 * 65536 + 17,)] * 18 + [(10_000_000,), (7,)]
    ref_params, fast_params = make_param_pairs(shapes, device=device, seed=9)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    exact = fp64_twin(name, ref_params, **RICH[name])
    step_and_compare(ref, fast, ref_params, fast_params, generator(10), 3, exact=exact)


@pytest.mark.parametrize("name", ["AdamW", "RMSprop", "Adagrad", "Adadelta"])
def test_thousands_of_tensors_span_several_launches(name):
    thousands_of_tensors(name, CUDA)


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad", "Adadelta"])
def test_a_ten_million_element_tensor_across_two_launches(name):
    ten_million_elements(name, CUDA)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("Adam", dict(amsgrad=False)),
        ("Adam", dict(amsgrad=True)),
        ("RMSprop", dict(weight_decay=0.1, momentum=0.5, centered=True)),
        ("Adagrad", dict(lr_decay=0.1, weight_decay=0.1)),
        ("Adadelta", dict(rho=0.8, weight_decay=0.1)),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_cuda_graph_capture_of_step(name, kwargs):
    """opt.step() (capturable=True where torch has the argument) captured once and replayed 5
    times with new grads and a new Tensor lr each time, against eager torch."""
    ref_params, fast_params = make_param_pairs(SHAPES, device=CUDA, seed=11)
    lr = torch.tensor(0.01, device=CUDA)
    fast_cls = getattr(fastopt, f"Fused{name}")
    has_capturable = "capturable" in inspect.signature(fast_cls).parameters
    fast = fast_cls(
        fast_params, lr=lr, **kwargs, **(dict(capturable=True) if has_capturable else {})
    )
    ref = getattr(torch.optim, name)(ref_params, lr=0.01, foreach=False, **kwargs)
    gen = generator(12)
    # Warm-up on a side stream creates the state (a real step, step 1).
    set_grads(gen, ref_params, fast_params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fast.step()
    torch.cuda.current_stream().wait_stream(side)
    ref.step()
    torch.cuda.synchronize()
    assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where="warm-up")

    graph = torch.cuda.CUDAGraph()
    static_grads = [p.grad for p in fast_params]
    with torch.cuda.graph(graph):
        fast.step()
    torch.cuda.synchronize()
    # Capturing ran nothing.
    assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where="captured")

    for replay in range(5):
        new_lr = 0.01 * (0.7**replay)
        grads = set_grads(gen, ref_params)
        for static, g in zip(static_grads, grads, strict=True):
            static.copy_(g)
        lr.fill_(new_lr)
        ref.param_groups[0]["lr"] = new_lr
        graph.replay()
        ref.step()
        torch.cuda.synchronize()
        assert_matches_reference(
            ref, fast, ref_params, fast_params, **FP32, where=f"replay {replay}"
        )
    assert all(fast.state[p]["step"].item() == 6 for p in fast_params)


# -- bad input -------------------------------------------------------------------------------


def test_cpu_and_cuda_params_in_one_group_are_refused():
    params = [torch.randn(7, device=CUDA, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = fastopt.FusedAdam(params, lr=0.01)
    set_grads(generator(17), params)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="is on cpu but param 0 of that group is on cuda"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_cpu_params_with_a_cuda_lr_are_refused():
    params = [torch.randn(7, requires_grad=True), torch.randn(3, 5, requires_grad=True)]
    opt = fastopt.FusedAdam(params, lr=torch.tensor(0.01, device=CUDA))
    set_grads(generator(18), params)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"lr.*cuda"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_a_second_gpu():
    ref_params, fast_params = make_param_pairs(SHAPES, device="cuda:1", seed=19)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=torch.tensor(0.01))
    with torch.cuda.device(0):  # the current device is not the params' one
        step_and_compare(ref, fast, ref_params, fast_params, generator(20), 3)
    for p in fast_params:
        assert fast.state[p]["step"].device == torch.device("cuda:1")
