"""Selective scan: the chunked PyTorch path against the plain float64 loop, mamba-ssm semantics, errors."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from chronos_video.ops import has_mamba_kernel, selective_scan, selective_scan_reference, selective_scan_torch


def make_inputs(
    batch=2,
    dim=4,
    n_state=3,
    length=37,
    complex_A=True,
    kind="variable",
    groups=2,
    dtype=torch.float64,
    seed=0,
):
    """Scan inputs in mamba-ssm's layout; kind is 'variable' (batch, N, L'), 'grouped' (batch, G, N, L') or
    'constant' (D, N). Complex A gives real variable B/C with interleaved (re, im) along time (L' = 2L)."""
    g = torch.Generator().manual_seed(seed)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    u = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    delta = torch.randn(batch, dim, length, generator=g, dtype=dtype) * 0.5 - 1.0
    decay = torch.rand(dim, n_state, generator=g, dtype=dtype) + 0.05
    if complex_A:
        A = torch.complex(-decay, torch.randn(dim, n_state, generator=g, dtype=dtype) * 3)
    else:
        A = -decay
    time = 2 * length if complex_A else length
    if kind == "variable":
        B, C = (torch.randn(batch, n_state, time, generator=g, dtype=dtype) for _ in range(2))
    elif kind == "grouped":
        B, C = (torch.randn(batch, groups, n_state, time, generator=g, dtype=dtype) for _ in range(2))
    else:
        matrix_dtype = complex_dtype if complex_A else dtype
        B, C = (torch.randn(dim, n_state, generator=g, dtype=matrix_dtype) for _ in range(2))
    D = torch.randn(dim, generator=g, dtype=dtype)
    z = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    delta_bias = torch.randn(dim, generator=g, dtype=dtype) * 0.3
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


CASES = [
    (complex_A, kind)
    for complex_A in (False, True)
    for kind in ("variable", "grouped", "constant")
]


def _max_rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("complex_A,kind", CASES)
@pytest.mark.parametrize("length", [5, 100, 300])
def test_forward_matches_sequential_loop(complex_A, kind, length):
    inputs = make_inputs(length=length, complex_A=complex_A, kind=kind)
    kwargs = dict(delta_softplus=True, return_last_state=True)
    out, last = selective_scan_torch(**inputs, **kwargs)
    ref_out, ref_last = selective_scan_reference(**inputs, **kwargs)
    assert out.shape == ref_out.shape == inputs["u"].shape and out.dtype == torch.float64
    assert last.shape == (2, 4, 3) and last.dtype == ref_last.dtype
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("complex_A,kind", CASES)
def test_gradients_match_sequential_loop(complex_A, kind):
    """Every input's gradient of a real loss (out and last state) equals plain autograd through the loop."""
    inputs = make_inputs(length=130, complex_A=complex_A, kind=kind, seed=1)
    weight = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for fn in (selective_scan_torch, selective_scan_reference):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
        loss = (out * weight).sum() + (last.abs() ** 2).sum() + last.real.sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, ours, ref in zip(inputs, *grads):
        assert ours.shape == inputs[name].shape and ours.dtype == inputs[name].dtype, name
        assert _max_rel_err(ours, ref) < 1e-10, name


def test_gradcheck_against_finite_differences():
    """Independent of the oracle: torch.autograd.gradcheck (complex A checked with Wirtinger calculus)."""
    inputs = make_inputs(batch=1, dim=2, n_state=2, length=19, complex_A=True, kind="variable", seed=3)
    names = ["u", "delta", "A", "B", "C"]
    leaves = [inputs[k].clone().requires_grad_(True) for k in names]

    def scan(u, delta, A, B, C):
        out, last = selective_scan_torch(u, delta, A, B, C, D=inputs["D"], delta_softplus=True, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_closed_form_two_steps_complex():
    """mamba-ssm semantics by hand: interleaved B/C, 2 Re(C h), D skip, silu(z) gate, bias + softplus."""
    a = complex(-0.5, 2.0)
    u = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.3, 0.7]]], dtype=torch.float64)
    bias = torch.tensor([0.1], dtype=torch.float64)
    b_steps = [complex(1.0, 2.0), complex(-0.5, 0.25)]
    c_steps = [complex(0.3, -1.0), complex(2.0, 0.5)]
    B = torch.tensor([[[v for c in b_steps for v in (c.real, c.imag)]]], dtype=torch.float64)  # (1, 1, 2L)
    C = torch.tensor([[[v for c in c_steps for v in (c.real, c.imag)]]], dtype=torch.float64)
    D = torch.tensor([0.7], dtype=torch.float64)
    z = torch.tensor([[[0.4, -1.2]]], dtype=torch.float64)
    A = torch.tensor([[a]], dtype=torch.complex128)

    dts = [math.log1p(math.exp(float(d) + 0.1)) for d in delta[0, 0]]
    h, expected = 0j, []
    for t in range(2):
        h = complex(torch.exp(torch.tensor(dts[t] * a))) * h + dts[t] * float(u[0, 0, t]) * b_steps[t]
        y = 2 * (c_steps[t] * h).real + 0.7 * float(u[0, 0, t])
        expected.append(y * float(F.silu(z[0, 0, t])))
    for fn in (selective_scan_torch, selective_scan_reference):
        out, last = fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(last[0, 0, 0], torch.tensor(h, dtype=torch.complex128))


@pytest.mark.parametrize("complex_A", [False, True])
def test_small_blocks_split_batch_and_channels(monkeypatch, complex_A):
    """Force many blocks (batch split, ragged channel blocks inside groups): results must not change."""
    import chronos_video.ops._scan_torch as scan_module

    monkeypatch.setattr(scan_module, "_BLOCK_ELEMENTS", 40 * 3)  # one (batch, channel) pair per block
    inputs = make_inputs(batch=3, dim=6, length=40, complex_A=complex_A, kind="grouped", groups=2, seed=6)
    leaves = [{k: v.clone().requires_grad_(True) for k, v in inputs.items()} for _ in range(2)]
    fns = (selective_scan_torch, selective_scan_reference)
    outs = [fn(**leaf, return_last_state=True) for fn, leaf in zip(fns, leaves)]
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for leaf, (out, last) in zip(leaves, outs):
        (out.sum() + last.real.sum()).backward()
    for name in inputs:
        assert _max_rel_err(leaves[0][name].grad, leaves[1][name].grad) < 1e-10, name

    monkeypatch.setattr(scan_module, "_BLOCK_ELEMENTS", 48 * 3 * 2 * 3)  # 2 batches x 3 channels: ragged
    monkeypatch.setattr(scan_module, "_MAX_CHANNELS_PER_BLOCK", 2)
    assert scan_module._block_plan(3, 3, 40, 3) == (3, 2)
    torch.testing.assert_close(selective_scan_torch(**inputs), selective_scan_reference(**inputs))


def test_complex_tensors_equal_interleaved_layout():
    inputs = make_inputs(complex_A=True, kind="grouped", length=40)
    as_complex = {k: torch.view_as_complex(inputs[k].unflatten(-1, (-1, 2))) for k in ("B", "C")}
    torch.testing.assert_close(selective_scan_torch(**{**inputs, **as_complex}), selective_scan_torch(**inputs))
    assert torch.equal(torch.view_as_real(as_complex["B"]).flatten(-2), inputs["B"])


@pytest.mark.parametrize("length", [4096, 16384])
def test_long_sequence_float32_is_accurate(length):
    """Long L in float32 with fast and very slow decays: no underflowing prefix products, no drift.

    The float64 oracle runs on the same float32-rounded inputs; the chunked scan must be as accurate as
    the plain float32 loop (both reach ~1e-5 at L=4096 and ~1e-4 at 16384 here: float32 rounding of the
    decays accumulates over the ~1e4-step memory of the slowest mode).
    """
    inputs = make_inputs(batch=1, dim=4, n_state=4, length=length, complex_A=True, dtype=torch.float32, seed=4)
    inputs["A"] = torch.complex(-torch.tensor([[1e-4, 1e-2, 1.0, 30.0]] * 4), inputs["A"].imag)
    out = selective_scan_torch(**inputs, delta_softplus=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = selective_scan_reference(
        **{k: v.cdouble() if v.is_complex() else v.double() for k, v in inputs.items()}, delta_softplus=True
    )
    loop_error = _max_rel_err(selective_scan_reference(**inputs, delta_softplus=True).double(), ref)
    error = _max_rel_err(out.double(), ref)
    assert error < 5e-4 and error < 1.5 * loop_error + 1e-6


def test_half_precision_inputs_keep_their_dtype():
    inputs = make_inputs(complex_A=True, length=64, dtype=torch.float32)
    for key in ("u", "delta", "B", "C", "z"):
        inputs[key] = inputs[key].to(torch.bfloat16)
    out = selective_scan(**inputs)
    assert out.dtype == torch.bfloat16
    expected = selective_scan_reference(**{k: v.cdouble() if v.is_complex() else v.double() for k, v in inputs.items()})
    assert _max_rel_err(out.double(), expected) < 2e-2


def test_saves_only_inputs_for_backward():
    """Checkpointing: autograd keeps O(batch*D*L) numbers, the loop keeps O(batch*D*N*L)."""
    inputs = make_inputs(batch=2, dim=8, n_state=16, length=256, complex_A=True, seed=5)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    saved = {}
    for name, fn in (("ours", selective_scan_torch), ("loop", selective_scan_reference)):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * (2 if t.is_complex() else 1)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(**leaves, delta_softplus=True)
        saved[name] = total[0]
    batch_dim_len = 2 * 8 * 256
    assert saved["ours"] <= 16 * batch_dim_len
    assert saved["loop"] >= 16 * batch_dim_len * 4


def test_dispatch_on_cpu_uses_torch_path():
    inputs = make_inputs(complex_A=True, length=50, dtype=torch.float32)
    assert torch.equal(selective_scan(**inputs), selective_scan_torch(**inputs))
    assert isinstance(has_mamba_kernel(), bool) and has_mamba_kernel() == has_mamba_kernel()


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(u=torch.zeros(2, 4)), ValueError, "`u`"),
        (dict(u=[[0.0]]), TypeError, "`u`"),
        (dict(delta=torch.zeros(2, 4, 36, dtype=torch.float64)), ValueError, "`delta`"),
        (dict(A=torch.zeros(3, 3, dtype=torch.complex128)), ValueError, "`A`"),
        (dict(B=torch.zeros(2, 3, 37, dtype=torch.float64)), ValueError, "2L"),
        (dict(C=torch.zeros(2, 3, 3, 74, dtype=torch.float64)), ValueError, "groups"),
        (dict(B=torch.zeros(4, 2, dtype=torch.complex128)), ValueError, "`B`"),
        (dict(D=torch.zeros(3, dtype=torch.float64)), ValueError, "`D`"),
        (dict(z=torch.zeros(2, 4, 5, dtype=torch.float64)), ValueError, "`z`"),
        (dict(delta_bias=torch.zeros(4, 1, dtype=torch.float64)), ValueError, "`delta_bias`"),
        (dict(u=torch.zeros(2, 4, 37, dtype=torch.complex128)), TypeError, "`u`"),
    ],
)
def test_invalid_inputs_name_the_argument(change, error, match):
    inputs = {**make_inputs(complex_A=True), **change}
    with pytest.raises(error, match=match):
        selective_scan(**inputs)


def test_complex_B_needs_complex_A():
    inputs = make_inputs(complex_A=False)
    inputs["B"] = torch.zeros(2, 3, 37, dtype=torch.complex128)
    with pytest.raises(TypeError, match="`B` is complex"):
        selective_scan(**inputs)


@pytest.mark.slow
def test_import_never_touches_mamba_ssm():
    """`import chronos_video` must work without mamba-ssm's CUDA extension: not even an import attempt."""
    code = (
        "import sys\n"
        "attempts = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mamba_ssm': attempts.append(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import chronos_video, chronos_video.ops\n"
        "assert not attempts, attempts\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_mamba_kernel()), reason="needs a CUDA GPU and mamba-ssm's CUDA kernel"
)
def test_mamba_kernel_matches_torch_path_complex():
    """GPU parity: mamba-ssm's kernel vs our PyTorch path with complex A (upstream does not test it)."""
    inputs = make_inputs(batch=2, dim=64, n_state=16, length=512, complex_A=True, kind="variable", dtype=torch.float32)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    grads = []
    outs = []
    for fn in (selective_scan, selective_scan_torch):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
        outs.append((out, last))
        grads.append(torch.autograd.grad(out.square().sum(), list(leaves.values())))
    assert _max_rel_err(outs[0][0], outs[1][0]) < 1e-3
    assert _max_rel_err(outs[0][1], outs[1][1]) < 1e-3
    for name, kernel_grad, torch_grad in zip(inputs, *grads):
        assert _max_rel_err(kernel_grad, torch_grad) < 5e-3, name
