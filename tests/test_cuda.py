"""FusedAdam on CUDA against torch.optim.Adam / AdamW(foreach=False) on CUDA: every option, fp32 /
fp64 / bf16 / fp16, GradScaler("cuda"), thousands of tensors (several kernel launches), a 10M
element tensor, CUDA graph capture, checkpoints, and bad input. Skipped without a GPU."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import (
    FP32,
    SHAPES,
    TOLERANCES,
    assert_matches_reference,
    assert_matches_reference_flat,
    assert_state_format,
    assert_unchanged,
    generator,
    make_param_pairs,
    optimizer_pair,
    run_against_torch,
    run_low_precision_against_torch,
    set_grads,
    snapshot,
)
from torch import nn

import fastopt
from fastopt import _extension

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    """On a GPU machine the CUDA kernels must be there: a missing build is a failure."""
    if not _extension.has_kernels("cuda"):
        pytest.fail(f"fastopt's CUDA kernels are not loaded: {_extension._load_errors.get('cuda')}")
    yield
    torch.cuda.synchronize()


OPTIONS = [
    pytest.param(
        dict(amsgrad=amsgrad, maximize=maximize, weight_decay=wd, tensor_lr=tensor_lr),
        id=f"ams{int(amsgrad)}-max{int(maximize)}-wd{wd}-{'tlr' if tensor_lr else 'flr'}",
    )
    for amsgrad, maximize, wd, tensor_lr in itertools.product(
        [False, True], [False, True], [0.0, 0.1], [False, True]
    )
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_torch_on_cuda(dtype, name, options):
    """Tensor lr on the device; params and every state tensor compared after every step."""
    run_against_torch(name, dtype, options, seed=1, steps=10, device=CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_on_cuda(dtype, name, amsgrad):
    options = dict(amsgrad=amsgrad, maximize=False, weight_decay=0.1)
    run_low_precision_against_torch(name, dtype, options, seed=2, device=CUDA)


@pytest.mark.parametrize("lr_device", ["cpu", CUDA])
def test_tensor_lr_on_either_device(lr_device):
    ref_params, fast_params = make_param_pairs(SHAPES, device=CUDA, seed=3)
    lr = torch.tensor(0.01, device=lr_device)
    ref, fast = optimizer_pair("AdamW", ref_params, fast_params, lr=lr, amsgrad=True)
    gen = generator(4)
    for step in range(5):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


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
    for step in range(4):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


def test_mixed_dtypes_in_one_group_on_cuda():
    gen = generator(6)
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32]
    shapes = [(4097,), (33, 65), (7,), (1000,), (0,)]
    starts = [
        torch.randn(s, generator=gen).to(dtype=d, device=CUDA)
        for s, d in zip(shapes, dtypes, strict=True)
    ]
    fast_params = [s.clone().requires_grad_() for s in starts]
    exact = [0, 2, 4]  # fp32 / fp64: compared with torch in the same dtype
    ref_params = [starts[i].clone().requires_grad_() for i in exact]
    fast = fastopt.FusedAdam(fast_params, lr=0.01, amsgrad=True)
    ref = torch.optim.Adam(ref_params, lr=0.01, amsgrad=True, foreach=False)
    for _ in range(4):
        grads = set_grads(gen, fast_params)
        for r, i in zip(ref_params, exact, strict=True):
            r.grad = grads[i].clone()
        ref.step()
        fast.step()
        for r, i in zip(ref_params, exact, strict=True):
            rtol, atol = TOLERANCES[r.dtype]
            torch.testing.assert_close(fast_params[i], r, rtol=rtol, atol=atol)
    for p in fast_params:
        assert_state_format(fast, p, amsgrad=True)
        assert fast.state[p]["step"].item() == 4


def test_thousands_of_tensors_span_several_launches():
    """1500 tensors of assorted sizes (and some without grads on some steps, so the step counts
    differ between tensors of one launch)."""
    gen = generator(7)
    sizes = torch.randint(0, 5000, (1500,), generator=gen).tolist()
    shapes = [(s,) if i % 4 else (max(1, s // 9), 9) for i, s in enumerate(sizes)]
    ref_params, fast_params = make_param_pairs(shapes, device=CUDA, seed=8)
    ref, fast = optimizer_pair(
        "AdamW", ref_params, fast_params, lr=0.01, weight_decay=0.1, amsgrad=True
    )
    for step in range(5):
        active = slice(None) if step % 2 == 0 else slice(None, None, 3)
        for p in (*ref_params, *fast_params):
            p.grad = None
        set_grads(gen, ref_params[active], fast_params[active])
        ref.step()
        fast.step()
        assert_matches_reference_flat(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    counts = {fast.state[p]["step"].item() for p in fast_params}
    assert counts == {3.0, 5.0}  # every third param stepped 5 times, the others 3


def test_a_ten_million_element_tensor_across_two_launches():
    """A 10M element tensor after 18 tensors of 11 chunks (of 65536 elements) each: one launch
    holds 320 chunks, so the big tensor starts in one launch and ends in the next."""
    shapes = [(10 * 65536 + 17,)] * 18 + [(10_000_000,), (7,)]
    ref_params, fast_params = make_param_pairs(shapes, device=CUDA, seed=9)
    ref, fast = optimizer_pair(
        "Adam", ref_params, fast_params, lr=0.01, weight_decay=0.1, amsgrad=True
    )
    gen = generator(10)
    for step in range(3):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_graph_capture_of_step(amsgrad):
    """opt.step() (capturable=True) captured once and replayed 5 times with new grads and a new
    Tensor lr each time, against eager torch.optim.Adam."""
    ref_params, fast_params = make_param_pairs(SHAPES, device=CUDA, seed=11)
    lr = torch.tensor(0.01, device=CUDA)
    fast = fastopt.FusedAdam(fast_params, lr=lr, amsgrad=amsgrad, capturable=True)
    ref = torch.optim.Adam(ref_params, lr=0.01, amsgrad=amsgrad, foreach=False)
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


# -- GradScaler ------------------------------------------------------------------------------


def test_grad_scaler_on_cuda_with_an_inf_step():
    torch.manual_seed(13)
    ref_model = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 7)).to(CUDA)
    fast_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01, amsgrad=True, foreach=False)
    fast_opt = fastopt.FusedAdam(fast_model.parameters(), lr=0.01, amsgrad=True)
    ref_scaler, fast_scaler = torch.amp.GradScaler(CUDA), torch.amp.GradScaler(CUDA)
    fast_params = list(fast_model.parameters())
    gen = generator(14)
    for step in range(5):
        x = torch.randn(5, 13, generator=gen).to(CUDA)
        y = torch.randn(5, 7, generator=gen).to(CUDA)
        pairs = ((ref_model, ref_opt, ref_scaler), (fast_model, fast_opt, fast_scaler))
        for model, opt, scaler in pairs:
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if step == 2:
                model[0].weight.grad[1, 2] = float("inf")
            if opt is fast_opt:
                before, scale_before = snapshot(opt, fast_params), scaler.get_scale()
                scaled = [p.grad.clone() for p in fast_params]
            scaler.step(opt)
            scaler.update()
        torch.cuda.synchronize()
        if step == 2:
            assert_unchanged(fast_opt, fast_params, before)
            assert fast_scaler.get_scale() == scale_before / 2
        else:
            for p, g in zip(fast_params, scaled, strict=True):  # stored back unscaled
                torch.testing.assert_close(p.grad, g / scale_before, rtol=0, atol=0)
        assert fast_scaler.get_scale() == ref_scaler.get_scale()
        assert_matches_reference(
            ref_opt, fast_opt, list(ref_model.parameters()), fast_params, **FP32, where=f"{step}"
        )
    assert all(fast_opt.state[p]["step"].item() == 4 for p in fast_params)


# -- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_checkpoint_round_trip_on_cuda(direction):
    """torch keeps `step` on the CPU (capturable=False), fastopt on the GPU: both load either."""
    uninterrupted, params = make_param_pairs(SHAPES, device=CUDA, seed=15)
    kwargs = dict(lr=0.01, amsgrad=True, weight_decay=0.1)
    reference = torch.optim.AdamW(uninterrupted, foreach=False, **kwargs)
    torch_opt = lambda ps: torch.optim.AdamW(ps, foreach=False, **kwargs)  # noqa: E731
    fast_opt = lambda ps: fastopt.FusedAdamW(ps, **kwargs)  # noqa: E731
    first, second = (
        (torch_opt, fast_opt) if direction == "torch->fastopt" else (fast_opt, torch_opt)
    )
    opt = first(params)
    gen = generator(16)
    for step in range(6):
        if step == 3:
            state_dict = copy.deepcopy(opt.state_dict())
            opt = second(params)
            opt.load_state_dict(state_dict)
        set_grads(gen, uninterrupted, params)
        reference.step()
        opt.step()
        assert_matches_reference(reference, opt, uninterrupted, params, **FP32, where=f"{step}")
    if isinstance(opt, fastopt.FusedAdamW):
        for p in params:
            assert opt.state[p]["step"].device == p.device


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
    gen = generator(20)
    with torch.cuda.device(0):  # the current device is not the params' one
        for step in range(3):
            set_grads(gen, ref_params, fast_params)
            ref.step()
            fast.step()
            assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    for p in fast_params:
        assert fast.state[p]["step"].device == torch.device("cuda:1")
