"""SSD (chunked, matmul) scans against the float64 sequential recurrences: values, gradients, long sequences, bf16."""

import importlib
import math

import pytest
import torch

from chronos_video.ops import (
    complex_ssd_scan,
    complex_ssd_scan_reference,
    has_mamba_ssd_kernel,
    selective_scan_reference,
    ssd_scan,
    ssd_scan_reference,
)
from chronos_video.ops.ssd_scan import cumulative_phase


def make_inputs(batch=2, length=37, heads=4, head_dim=3, groups=2, n_state=5, dtype=torch.float64, seed=0, complex_bc=True):
    """Scan inputs in mamba-ssm's SSD layout; complex B/C for the complex scan, real ones otherwise."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    inputs = dict(
        x=randn(batch, length, heads, head_dim),
        dt=randn(batch, length, heads, scale=0.5) - 1.0,  # pre-softplus
        A=-(torch.rand(heads, generator=g, dtype=dtype) + 0.1),
        D=randn(heads, head_dim),
        z=randn(batch, length, heads, head_dim),
        dt_bias=randn(heads, scale=0.3),
    )
    if complex_bc:
        inputs["B"], inputs["C"] = (torch.complex(randn(batch, length, groups, n_state), randn(batch, length, groups, n_state))
                                    for _ in range(2))
        inputs["omega"] = randn(heads, n_state, scale=3.0)
        inputs["phase"] = randn(batch, length, n_state)
        inputs["initial_states"] = torch.complex(randn(batch, heads, head_dim, n_state), randn(batch, heads, head_dim, n_state))
    else:
        inputs["B"], inputs["C"] = randn(batch, length, groups, n_state), randn(batch, length, groups, n_state)
        inputs["initial_states"] = randn(batch, heads, head_dim, n_state)
    return inputs


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_matches_reference(scan, reference, inputs, chunk_size, seed):
    """Output, final state and every input's gradient of a loss on both equal autograd through the float64 loop."""
    weight = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    results = []
    for fn, extra in ((scan, dict(chunk_size=chunk_size)), (reference, {})):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out, state = fn(**leaves, **extra, dt_softplus=True, return_final_states=True)
        loss = (out * weight).sum() + (state.abs() ** 2).sum() + state.real.sum()
        results.append((out, state, torch.autograd.grad(loss, list(leaves.values()))))
    (out, state, grads), (ref_out, ref_state, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)
    for name, ours, ref in zip(inputs, grads, ref_grads):
        assert ours.shape == inputs[name].shape and ours.dtype == inputs[name].dtype, name
        assert rel_err(ours, ref) < 1e-9, name


ROTATIONS = [(True, True), (True, False), (False, True), (False, False)]  # (omega, phase)


@pytest.mark.parametrize("use_omega, use_phase", ROTATIONS)
@pytest.mark.parametrize("length, chunk_size", [(1, 64), (5, 2), (37, 8), (130, 64), (130, 16), (64, 64)])
def test_complex_forward_matches_sequential_recurrence(use_omega, use_phase, length, chunk_size):
    inputs = make_inputs(length=length)
    if not use_omega:
        inputs.pop("omega")
    if not use_phase:
        inputs.pop("phase")
    out, state = complex_ssd_scan(**inputs, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
    ref_out, ref_state = complex_ssd_scan_reference(**inputs, dt_softplus=True, return_final_states=True)
    assert out.shape == inputs["x"].shape and out.dtype == torch.float64
    assert state.shape == (2, 4, 3, 5) and state.dtype == torch.complex128
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_omega, use_phase", ROTATIONS)
def test_complex_gradients_match_sequential_recurrence(use_omega, use_phase):
    """Every input's gradient of a loss on the output and the final state equals autograd through the loop."""
    inputs = make_inputs(length=70, seed=1)
    if not use_omega:
        inputs.pop("omega")
    if not use_phase:
        inputs.pop("phase")
    assert_matches_reference(complex_ssd_scan, complex_ssd_scan_reference, inputs, chunk_size=16, seed=2)


@pytest.mark.parametrize("length, chunk_size", [(1, 4), (37, 8), (100, 32)])
def test_real_ssd_matches_sequential_loop_values_and_gradients(length, chunk_size):
    inputs = make_inputs(length=length, complex_bc=False, seed=3)
    assert_matches_reference(ssd_scan, ssd_scan_reference, inputs, chunk_size=chunk_size, seed=4)


def test_complex_ssd_equals_selective_scan_with_a_decay_shared_per_head():
    """The conventions agree with `selective_scan`: A[d, n] = A_h + i omega[h, n] per channel, y = 2 Re(C h) + D x."""
    batch, length, heads, head_dim, n_state = 2, 45, 3, 2, 4
    inputs = make_inputs(batch=batch, length=length, heads=heads, head_dim=head_dim, groups=1, n_state=n_state, seed=5)
    dt = torch.nn.functional.softplus(inputs["dt"])
    out = complex_ssd_scan(inputs["x"], dt, inputs["A"], inputs["B"], inputs["C"], omega=inputs["omega"], chunk_size=8,
                           D=inputs["D"])
    channels = heads * head_dim
    A_channels = torch.complex(inputs["A"][:, None].expand(heads, n_state), inputs["omega"]).repeat_interleave(head_dim, 0)
    selective = selective_scan_reference(
        inputs["x"].reshape(batch, length, channels).transpose(1, 2),
        dt.repeat_interleave(head_dim, dim=2).transpose(1, 2),
        A_channels,
        inputs["B"][:, :, 0].transpose(1, 2),
        inputs["C"][:, :, 0].transpose(1, 2),
        D=inputs["D"].reshape(channels),
    )
    torch.testing.assert_close(out.reshape(batch, length, channels).transpose(1, 2), selective, rtol=1e-10, atol=1e-10)


def test_interleaved_real_pairs_equal_complex_B_C():
    inputs = make_inputs(length=20)
    pairs = {k: torch.view_as_real(inputs[k]).flatten(-2) for k in ("B", "C")}
    torch.testing.assert_close(complex_ssd_scan(**{**inputs, **pairs}), complex_ssd_scan(**inputs), rtol=0, atol=0)


def test_per_head_phase_and_groups_broadcast():
    inputs = make_inputs(length=30, heads=4, groups=1)
    per_head = inputs["phase"].unsqueeze(2).repeat(1, 1, 4, 1)
    torch.testing.assert_close(complex_ssd_scan(**{**inputs, "phase": per_head}, chunk_size=8),
                               complex_ssd_scan(**inputs, chunk_size=8), rtol=1e-12, atol=1e-12)
    per_head[:, :, 1] += 0.5
    torch.testing.assert_close(complex_ssd_scan(**{**inputs, "phase": per_head}, chunk_size=8),
                               complex_ssd_scan_reference(**{**inputs, "phase": per_head}), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [4096, 16384])
def test_long_sequences_match_the_float64_recurrence(length):
    """16k steps: the float64 chunked scan equals the loop; float32 stays close (chunk-local decays and phases)."""
    inputs = make_inputs(batch=1, length=length, heads=2, head_dim=2, groups=1, n_state=2, seed=6)
    inputs["A"] = inputs["A"] * 0.02  # slow decay: the state remembers thousands of steps
    inputs["omega"] = inputs["omega"] * 10  # cumulative phases far beyond float32's exact range
    ref = complex_ssd_scan_reference(**inputs, dt_softplus=True)
    assert rel_err(complex_ssd_scan(**inputs, chunk_size=64, dt_softplus=True), ref) < 1e-10
    single = {k: (v.to(torch.complex64) if v.is_complex() else v.float()) for k, v in inputs.items()}
    out32 = complex_ssd_scan(**single, chunk_size=64, dt_softplus=True)
    assert out32.dtype == torch.float32 and rel_err(out32.double(), ref) < 2e-4


def test_long_sequence_gradients_match_the_float64_recurrence():
    inputs = make_inputs(batch=1, length=2048, heads=2, head_dim=2, groups=1, n_state=2, seed=7)
    inputs["A"] = inputs["A"] * 0.05
    grads = []
    for fn, extra in ((complex_ssd_scan, dict(chunk_size=64)), (complex_ssd_scan_reference, {})):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        grads.append(torch.autograd.grad(fn(**leaves, **extra, dt_softplus=True).square().sum(), list(leaves.values())))
    for name, ours, ref in zip(inputs, *grads):
        assert rel_err(ours, ref) < 1e-8, name


def test_strong_decay_and_large_steps_never_overflow():
    """Segment sums reach -1e4 inside a chunk: masked before `exp`, so nothing overflows; results match the loop."""
    inputs = make_inputs(length=300, seed=8)
    inputs["dt"] = inputs["dt"].abs() * 40 + 20  # softplus ~ 20..100 per step, A ~ -0.1..-1.1
    out = complex_ssd_scan(**inputs, chunk_size=128, dt_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, complex_ssd_scan_reference(**inputs, dt_softplus=True), rtol=1e-9, atol=1e-9)
    single = {k: (v.to(torch.complex64) if v.is_complex() else v.float()) for k, v in inputs.items()}
    leaves = {k: v.requires_grad_(True) for k, v in single.items()}
    complex_ssd_scan(**leaves, chunk_size=128, dt_softplus=True).sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


def test_cumulative_phase_is_exact_and_wrapped():
    dt = torch.rand(1, 10000, 2, dtype=torch.float32, generator=torch.Generator().manual_seed(9))
    omega = torch.tensor([[50.0, 3.0], [7.0, 0.1]])
    exact = torch.cumsum(dt.double().unsqueeze(-1) * omega.double(), dim=1)
    phase = cumulative_phase(dt, omega)
    assert phase.dtype == torch.float32 and phase.abs().max() <= math.pi
    wrapped_error = torch.remainder(phase.double() - exact + math.pi, 2 * math.pi) - math.pi
    assert wrapped_error.abs().max() < 1e-6  # a float32 running sum would be off by ~1e-3 rad here
    naive = torch.cumsum(dt.unsqueeze(-1) * omega, dim=1).double()
    assert (torch.remainder(naive - exact + math.pi, 2 * math.pi) - math.pi).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matmuls_keep_decays_in_float32(dtype):
    inputs = make_inputs(batch=1, length=500, heads=4, head_dim=8, groups=1, n_state=8, seed=10)
    ref = complex_ssd_scan_reference(**inputs, dt_softplus=True)
    half = dict(inputs)
    half["x"] = inputs["x"].to(dtype)
    half["B"], half["C"] = (torch.view_as_real(inputs[k]).flatten(-2).to(dtype) for k in ("B", "C"))
    out = complex_ssd_scan(**{k: (v.float() if k in ("dt", "A", "omega", "phase", "D", "dt_bias", "z") else v)
                              for k, v in half.items() if k != "initial_states"}, chunk_size=64, dt_softplus=True,
                           initial_states=inputs["initial_states"].to(torch.complex64))
    assert out.dtype == dtype
    assert rel_err(out.double(), ref) < 3e-2


def test_padding_steps_are_transparent_and_chunk_size_does_not_matter():
    inputs = make_inputs(length=53, seed=11)
    outs = [complex_ssd_scan(**inputs, chunk_size=c, return_final_states=True) for c in (1, 4, 16, 53, 64, 1000)]
    for out, state in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state, outs[0][1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("complex_bc", [True, False])
def test_segmented_scan_matches_the_recurrence_in_values_and_gradients(monkeypatch, complex_bc):
    """Long inputs run in cache-sized segments with the state carried across: a tiny budget forces several."""
    ssd_module = importlib.import_module("chronos_video.ops.ssd_scan")  # the package's `ssd_scan` is the function
    monkeypatch.setattr(ssd_module, "_SEGMENT_BYTES", 1)  # one chunk per segment
    assert len(ssd_module._segments(70, 2, 4, 8)) == 9
    inputs = make_inputs(length=70, seed=21, complex_bc=complex_bc)
    scan, reference = (complex_ssd_scan, complex_ssd_scan_reference) if complex_bc else (ssd_scan, ssd_scan_reference)
    assert_matches_reference(scan, reference, inputs, chunk_size=8, seed=22)


def test_segments_are_whole_balanced_chunks():
    from chronos_video.ops.ssd_scan import _SEGMENT_BYTES, _segments

    per_chunk_row = 4 * 8 * 32 * 32 * 4  # batch 4, 8 heads, chunk 32, float32
    spans = _segments(16392, 4, 8, 32)
    assert spans[0][0] == 0 and spans[-1][1] == 16392
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all((end - start) % 32 == 0 for start, end in spans[:-1])
    assert max(end - start for start, end in spans) * per_chunk_row // 32 <= _SEGMENT_BYTES
    assert len(spans) == 5 and _segments(520, 32, 8, 32) == [(0, 288), (288, 520)]


@pytest.mark.parametrize("phase_per_head", [False, True])
@pytest.mark.parametrize("tiny_segments", [False, True])
def test_group_rotation_clock_matches_the_recurrence(monkeypatch, phase_per_head, tiny_segments):
    """`rotation_dt` (one rotation clock per group): values, final state and every gradient against the loop."""
    if tiny_segments:
        monkeypatch.setattr(importlib.import_module("chronos_video.ops.ssd_scan"), "_SEGMENT_BYTES", 1)
    inputs = make_inputs(length=45, seed=31)
    g = torch.Generator().manual_seed(32)
    inputs["omega"] = torch.randn(2, 5, generator=g, dtype=torch.float64) * 3.0
    inputs["rotation_dt"] = torch.rand(2, 45, 2, generator=g, dtype=torch.float64) + 0.05
    if phase_per_head:
        inputs["phase"] = torch.randn(2, 45, 4, 5, generator=g, dtype=torch.float64)
    assert_matches_reference(complex_ssd_scan, complex_ssd_scan_reference, inputs, chunk_size=8, seed=33)


def test_group_rotation_clock_equal_to_the_heads_steps_is_the_per_head_rotation():
    """When the heads of a group step together, a group clock is the per-head rotation it replaces."""
    inputs = make_inputs(length=30, seed=33)
    inputs["dt"] = inputs["dt"][:, :, ::2].repeat_interleave(2, dim=2)  # heads (0, 1) and (2, 3) share steps
    inputs["dt_bias"] = inputs["dt_bias"][::2].repeat_interleave(2)
    group_omega = inputs["omega"][::2]
    inputs["omega"] = group_omega.repeat_interleave(2, dim=0)
    per_head = complex_ssd_scan(**inputs, chunk_size=8, dt_softplus=True)
    clock = torch.nn.functional.softplus(inputs["dt"][:, :, ::2] + inputs["dt_bias"][::2])
    grouped = complex_ssd_scan(**{**inputs, "omega": group_omega}, chunk_size=8, dt_softplus=True, rotation_dt=clock)
    torch.testing.assert_close(grouped, per_head, rtol=1e-10, atol=1e-10)


def test_zero_step_tokens_are_transparent():
    """dt = 0 (the wavelet gate's skipped or padding tokens): decay 1, no rotation, no input."""
    inputs = make_inputs(length=40, seed=12)
    for name in ("dt_bias", "D", "z"):
        inputs.pop(name)
    dt = torch.rand(2, 40, 4, dtype=torch.float64)
    keep = torch.rand(2, 40, generator=torch.Generator().manual_seed(13)) > 0.4
    masked = complex_ssd_scan(**{**inputs, "dt": dt * keep[..., None]}, chunk_size=8)
    for b in range(2):
        idx = keep[b].nonzero().squeeze(-1)
        sub = {k: (v[b : b + 1, idx] if k in ("x", "B", "C", "phase") else v) for k, v in inputs.items() if k != "dt"}
        sub["initial_states"] = inputs["initial_states"][b : b + 1]
        kept = complex_ssd_scan(**sub, dt=dt[b : b + 1, idx], chunk_size=8)
        torch.testing.assert_close(masked[b : b + 1, idx], kept, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.zeros(2, 37, 4)), ValueError, "`x`"),
        (dict(x=[[0.0]]), TypeError, "`x`"),
        (dict(dt=torch.zeros(2, 36, 4, dtype=torch.float64)), ValueError, "`dt`"),
        (dict(A=torch.zeros(4, 5, dtype=torch.float64)), ValueError, "`A`"),
        (dict(B=torch.zeros(2, 37, 3, 5, dtype=torch.complex128)), ValueError, "groups"),
        (dict(C=torch.zeros(2, 37, 2, 4, dtype=torch.complex128)), ValueError, "same shape"),
        (dict(omega=torch.zeros(4, 4, dtype=torch.float64)), ValueError, "`omega`"),
        (dict(phase=torch.zeros(2, 37, 3, dtype=torch.float64)), ValueError, "`phase`"),
        (dict(D=torch.zeros(3, dtype=torch.float64)), ValueError, "`D`"),
        (dict(initial_states=torch.zeros(2, 4, 3, 5, dtype=torch.float64)), TypeError, "`initial_states`"),
        (dict(chunk_size=0), ValueError, "`chunk_size`"),
        (dict(rotation_dt=torch.ones(2, 37, 2, dtype=torch.float64)), ValueError, "`omega`"),  # omega is (heads, N)
        (dict(rotation_dt=torch.ones(2, 37, 4, dtype=torch.float64)), ValueError, "`rotation_dt`"),
        (dict(rotation_dt=torch.ones(2, 37, 2, dtype=torch.float64), omega=None), ValueError, "`rotation_dt`"),
    ],
)
def test_invalid_inputs_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        complex_ssd_scan(**{**make_inputs(), **change})


def test_real_pairs_need_an_even_last_dim():
    inputs = make_inputs(length=10)
    inputs["B"] = inputs["C"] = torch.zeros(2, 10, 2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="interleaved"):
        complex_ssd_scan(**inputs)


def test_dispatch_on_cpu_uses_torch_path():
    assert isinstance(has_mamba_ssd_kernel(), bool) and has_mamba_ssd_kernel() == has_mamba_ssd_kernel()
    inputs = make_inputs(length=20, complex_bc=False, dtype=torch.float32)
    torch.testing.assert_close(ssd_scan(**inputs), ssd_scan_reference(**inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and has_mamba_ssd_kernel()),
                    reason="needs a CUDA GPU and mamba-ssm's Triton SSD kernel (mamba_chunk_scan_combined)")
def test_mamba_ssd_kernel_matches_torch_path():
    """GPU parity: the kernel path (CUDA tensors) against our PyTorch path (the same inputs on the CPU)."""
    inputs = make_inputs(batch=2, length=1000, heads=4, head_dim=16, groups=1, n_state=16, dtype=torch.float32)
    for fn in (complex_ssd_scan,):
        outs, grads = [], []
        for device in ("cuda", "cpu"):
            leaves = {k: v.to(device).clone().requires_grad_(True) for k, v in inputs.items()}
            out = fn(**leaves, chunk_size=64, dt_softplus=True)
            outs.append(out.cpu())
            grads.append([g.cpu() for g in torch.autograd.grad(out.square().sum(), list(leaves.values()))])
        # The kernel's float32 matmuls run in TF32 (10-bit mantissa): on an H200 the output differed by 1.5e-3
        # and the gradients by 2.9e-3 at every length from 1k to 64k (benchmarks/bench_gpu.py), a rounding floor, not drift.
        assert rel_err(outs[0], outs[1]) < 5e-3
        for name, kernel_grad, torch_grad in zip(inputs, *grads):
            assert rel_err(kernel_grad, torch_grad) < 5e-3, name
