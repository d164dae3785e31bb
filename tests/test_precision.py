"""Tests for chronos_video.precision: grids, controller, entropy, schedules, profiler."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding
from scipy.stats import spearmanr

from chronos_video.precision import (
    BF16,
    E2M1,
    E4M3,
    FP16,
    PrecisionController,
    PrecisionRule,
    PrecisionSchedule,
    check_native_support,
    fp8_codes,
    fp8_linear_native,
    histogram_entropy,
    kde_entropy,
    profile_sensitivity,
    quantize_dequantize,
    quantize_nvfp4,
    resolve_precision,
    round_to_format,
    select_layers,
    wavelet_energy,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().view(torch.int32)


def _assert_bit_equal(mine: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(mine.isnan(), ref.isnan())
    keep = ~ref.isnan()
    mismatches = (_bits(mine)[keep] != _bits(ref)[keep]).sum().item()
    assert mismatches == 0, f"{mismatches} elements differ"


def _probe_values() -> torch.Tensor:
    """fp32 values across the whole range: a stride through all bit patterns plus edge cases."""
    strided = torch.arange(-(2**31), 2**31 - 1, 8191, dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, 449.0, 463.99, 464.0, 480.0, -1e30,
         2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 3 * 2.0**-10, 65504.0, 65519.99, 65520.0, 1e-45, 2.0**-133, 2.0**-134]
    )
    return torch.cat([strided, special])


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, dtype, saturate", [(E4M3, torch.float8_e4m3fn, True), (BF16, torch.bfloat16, False), (FP16, torch.float16, False)]
)
def test_round_to_format_matches_torch_casts_bit_exactly(fmt, dtype, saturate):
    x = _probe_values()
    _assert_bit_equal(round_to_format(x, fmt, saturate=saturate), x.to(dtype).float())


def test_bf16_fp16_gauges_match_torch_casts():
    x = torch.randn(64, 48) * torch.logspace(-6, 6, 48)
    _assert_bit_equal(quantize_dequantize(x, "bf16"), x.to(torch.bfloat16).float())
    _assert_bit_equal(quantize_dequantize(x, "fp16"), x.to(torch.float16).float())
    assert quantize_dequantize(x, "fp32") is x


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_fp8_grid_matches_torch_float8_cast(scaling):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 80, generator=generator) * torch.logspace(-4, 3, 80)
    x[3, 7] = 5e4  # outlier row
    amax = x.abs().amax(dim=-1, keepdim=True) if scaling == "row" else x.abs().amax()
    scale = amax / 448.0
    reference = (x / scale).to(torch.float8_e4m3fn).float() * scale
    mine = quantize_dequantize(x, "fp8", fp8_scaling=scaling)
    _assert_bit_equal(mine, reference)
    # the largest element of each row (or the tensor) lands exactly on +-448 * scale
    largest = mine.abs().amax(dim=-1, keepdim=True) if scaling == "row" else mine.abs().amax()
    assert torch.equal(largest, 448.0 * scale)


def test_nvfp4_matches_torchao_reference():
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    generator = torch.Generator().manual_seed(1)
    for shape in [(8, 64), (2, 4, 32), (16, 128)]:
        x = torch.randn(shape, generator=generator) * torch.logspace(-3, 2, shape[-1])
        for tensor in (x, x.bfloat16()):
            tensor_scale = nvfp4.per_tensor_amax_to_scale(tensor.abs().amax())
            reference = nvfp4.NVFP4Tensor.to_nvfp4(tensor.contiguous(), per_tensor_scale=tensor_scale).dequantize(torch.float32)
            _assert_bit_equal(quantize_nvfp4(tensor).dequantize(), reference)


def test_nvfp4_structure_by_enumeration():
    """Independent of torchao: elements are E2M1 values, block scales E4M3 values, and each
    element is the nearest E2M1 value of x / (tensor_scale * block_scale) (ties to even)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(12, 40, generator=generator) * 3  # 40 is not a multiple of 16: padded
    parts = quantize_nvfp4(x)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert parts.elements.shape == (12, 3, 16)
    assert torch.isin(parts.elements.abs(), e2m1).all()
    assert torch.equal(parts.block_scales.to(torch.float8_e4m3fn).float(), parts.block_scales)
    assert parts.block_scales.min() >= 2.0**-6 and parts.block_scales.max() <= 448
    assert parts.tensor_scale.dtype == torch.float32 and parts.tensor_scale.dim() == 0
    assert torch.isclose(parts.tensor_scale, x.abs().max() / (448 * 6))

    padded = F.pad(x, (0, 8)).reshape(12, 3, 16)
    target = (padded * ((1.0 / parts.tensor_scale) / parts.block_scales).unsqueeze(-1)).clamp(-6, 6)
    distance = (target.abs().unsqueeze(-1) - e2m1).abs()
    nearest = e2m1[distance.argmin(dim=-1)]  # argmin picks the smaller value on a tie ...
    tie = (distance.sort(dim=-1).values[..., :2].diff(dim=-1).squeeze(-1) == 0)
    odd = torch.tensor([False, True, False, True, False, True, False, True])  # ... E2M1 codes with odd mantissa
    odd_pick = odd[distance.argmin(dim=-1)]
    nearest = torch.where(tie & odd_pick, e2m1[(distance.argmin(dim=-1) + 1).clamp(max=7)], nearest)
    assert torch.equal(parts.elements.abs(), nearest)
    assert torch.equal(parts.dequantize(), quantize_dequantize(x, "nvfp4"))
    assert parts.dequantize().shape == x.shape


def test_saturation_zero_and_nan_handling():
    x = torch.tensor([[1.0, -2.0, float("inf"), float("nan")], [0.0, -0.0, 0.0, 0.0], [3.0, -float("inf"), 0.5, -0.25]])
    y = quantize_dequantize(x, "fp8")
    assert torch.isnan(y[0, 3]) and not torch.isnan(y[0, :3]).any()
    assert y[0, 2] == 448 * (2.0 / 448)  # +inf saturates to the row's largest finite magnitude
    assert y[2, 1] == -3.0  # -inf saturates too
    assert torch.equal(y[1], x[1]) and torch.signbit(y[1, 1])  # zero row stays zero, -0.0 kept
    y4 = quantize_dequantize(x, "nvfp4")
    assert torch.isnan(y4[0, 3]) and torch.isfinite(y4[0, :3]).all() and torch.equal(y4[1], x[1])
    assert torch.equal(quantize_dequantize(torch.zeros(3, 16), "nvfp4"), torch.zeros(3, 16))
    assert torch.isinf(quantize_dequantize(torch.tensor([70000.0]), "fp16")).all()  # IEEE half overflows
    assert round_to_format(torch.tensor([100.0, -7.0]), E2M1).tolist() == [6.0, -6.0]
    with pytest.raises(ValueError, match="unknown gauge"):
        quantize_dequantize(x, "int4")
    with pytest.raises(ValueError, match="fp8_scaling"):
        quantize_dequantize(x, "fp8", fp8_scaling="column")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_dequantize(torch.arange(4), "fp8")


# ---------------------------------------------------------------------------------------------
# Controller
# ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x, cond):
        shift, scale = self.modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x) * (1 + scale) + shift)))


class _TinyDenoiser(nn.Module):
    def __init__(self, dim: int = 32, channels: int = 4, vocab: int = 10):
        super().__init__()
        self.patch_embed = nn.Linear(channels, dim)
        self.token_table = nn.Embedding(vocab, dim)
        self.cond_mlp = TimestepEmbedding(1, dim)  # excluded by type only (its name matches no pattern)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(2)])
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x, sigma, label):
        cond = self.cond_mlp(sigma.view(-1, 1)) + self.token_table(label)
        h = self.patch_embed(x)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h, cond)
        return self.proj_out(h)


def _tiny_inputs(batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, 4, generator=generator), torch.rand(batch, generator=generator), torch.arange(batch)


def test_layer_selection_keeps_conditioning_norms_and_embeddings_high():
    model = _TinyDenoiser()
    assert set(select_layers(model)) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    assert "conv" in select_layers(model, include_conv=True)
    assert "proj_out" in select_layers(model, exclude=())  # patterns are configurable
    assert "cond_mlp.linear_1" in select_layers(model, exclude=(), exclude_types=())
    assert set(select_layers(model, exclude=lambda name, module: "fc2" in name)) >= {"blocks.0.modulation", "patch_embed"}
    with pytest.raises(TypeError, match="exclude"):
        select_layers(model, exclude="norm")


def test_controller_swaps_prequantized_banks_by_pointer_and_restores_bit_exactly():
    torch.manual_seed(0)
    model = _TinyDenoiser().eval()
    inputs = _tiny_inputs()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(*inputs)

    controller = PrecisionController(model, gauges=("bf16", "fp8", "nvfp4"), include_conv=True)
    controlled = set(controller.layer_names)
    assert controlled == {"conv", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    built = controller.num_quantized_tensors
    assert built == 3 * len(controlled)
    fp8_bank = controller.bank("fp8")

    outputs = {}
    for gauge in ("fp8", "bf16", "nvfp4", "fp8", "fp32", "fp8"):
        controller.set_gauge(gauge)
        for name in controlled:
            weight = model.get_submodule(name).weight
            bank_ptr = controller.bank(gauge)[name].data_ptr()
            assert weight.data_ptr() == bank_ptr  # pointer swap, no copy
        with torch.no_grad():
            outputs[gauge] = model(*inputs)
    assert controller.num_quantized_tensors == built  # never re-quantized
    for name in controlled:
        assert model.get_submodule(name).weight.data_ptr() == fp8_bank[name].data_ptr()
        assert torch.equal(fp8_bank[name], F.pad(fp8_bank[name], (0, 0)))

    # excluded layers are never touched, whatever the gauge
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in controlled or name.endswith("bias"):
            assert param.data_ptr() == pointers[name] and torch.equal(param, snapshot[name])

    errors = {g: (outputs[g] - reference).abs().max().item() for g in ("bf16", "fp8", "nvfp4")}
    assert torch.equal(outputs["fp32"], reference)  # fp32: hooks are inactive
    assert 0 < errors["bf16"] < errors["fp8"] < errors["nvfp4"] < 0.5 * reference.abs().max().item()

    controller.restore()
    for name, param in model.named_parameters():
        assert param.data_ptr() == pointers[name] and torch.equal(param, snapshot[name])
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference)

    with controller.use("nvfp4"):
        assert controller.current_gauge == "nvfp4"
    assert controller.current_gauge == "fp32"
    controller.remove()
    assert not model.blocks[0].fc1._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference)


def test_controller_emulates_weights_and_activations_exactly():
    torch.manual_seed(1)
    layer = nn.Linear(48, 24)
    model = nn.Sequential(layer)
    x = torch.randn(5, 48)
    with PrecisionController(model, gauges=("fp8", "nvfp4"), exclude=()) as controller:
        for gauge in ("fp8", "nvfp4"):
            controller.set_gauge(gauge)
            expected = F.linear(quantize_dequantize(x, gauge), controller.bank(gauge)["0"], layer.bias)
            assert torch.equal(model(x), expected)
        weight_only = PrecisionController(nn.Sequential(nn.Linear(48, 24)), gauges=("fp8",), exclude=(), quantize_activations=False)
        weight_only.set_gauge("fp8")
        inner = weight_only.model[0]
        assert torch.equal(inner(x), F.linear(x, quantize_dequantize(weight_only._originals["0"], "fp8"), inner.bias))
    assert layer.weight.data_ptr() == controller._originals["0"].data_ptr()


def test_controller_per_layer_overrides_and_errors():
    model = _TinyDenoiser()
    original = {n: model.get_submodule(n).weight.data_ptr() for n in select_layers(model)}
    controller = PrecisionController(model, gauges=("fp8", "nvfp4"))
    controller.set_gauge("fp32", overrides={"blocks.0.fc1": "nvfp4", "blocks.1.*": "fp8"})
    assert controller.layer_gauges == {"blocks.0.fc1": "nvfp4", "blocks.0.fc2": "fp32", "blocks.1.fc1": "fp8", "blocks.1.fc2": "fp8"}
    assert model.blocks[0].fc2.weight.data_ptr() == original["blocks.0.fc2"]
    assert model.blocks[0].fc1.weight.data_ptr() == controller.bank("nvfp4")["blocks.0.fc1"].data_ptr()
    with pytest.raises(ValueError, match="no weight bank"):
        controller.set_gauge("bf16")
    with pytest.raises(ValueError, match="excluded"):
        controller.set_gauge("fp8", overrides={"proj_out": "fp8"})
    with pytest.raises(ValueError, match="backend"):
        PrecisionController(model, backend="tensorrt")
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    tied_controller = PrecisionController(tied, gauges=("fp8",), exclude=())
    assert tied_controller.layer_names == ["0"] and "shares its weight" in tied_controller.skipped_layers["1"]
    model.blocks[1].fc1.weight.data = model.blocks[1].fc1.weight.data.clone()  # changed behind its back
    with pytest.raises(RuntimeError, match="outside the controller"):
        controller.set_gauge("nvfp4")


def test_native_backend_requirements_and_cpu_paths():
    model = _TinyDenoiser()
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        with pytest.raises(RuntimeError, match=r"compute capability >= 8\.9"):
            PrecisionController(model, gauges=("fp8",), backend="native")
    with pytest.raises(RuntimeError, match=r"compute capability >= 10\.0"):
        check_native_support("nvfp4", "cpu")
    check_native_support("bf16", "cpu")  # no requirement
    # bf16 runs natively everywhere: a real bf16 matmul, close to the emulated grid
    inputs = _tiny_inputs()
    emulated = PrecisionController(model, gauges=("bf16",))
    with torch.no_grad(), emulated.use("bf16"):
        expected = model(*inputs)
    emulated.remove()
    native = PrecisionController(model, gauges=("bf16",), backend="native")
    with torch.no_grad():
        native.set_gauge("bf16")
        got = model(*inputs)
        native.restore()
        restored = model(*inputs)
    native.remove()
    assert "forward" not in model.blocks[0].fc1.__dict__
    assert (got - expected).abs().max() < 0.05 and not torch.equal(got, restored)


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_fp8_scaled_mm_wrapper_matches_emulation(scaling):
    """The native FP8 matmul wrapper (layouts, scale shapes) against the exact grids. torch
    2.13 also implements torch._scaled_mm on CPU, which lets this run without a GPU."""
    generator = torch.Generator().manual_seed(3)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 5, 64), (32, 64), (32,)))
    codes, scale = fp8_codes(weight, scaling)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == ((32, 1) if scaling == "row" else ())
    try:
        got = fp8_linear_native(x, codes, scale, bias, scaling)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm is not available on this device: {error}")
    product = F.linear(
        quantize_dequantize(x, "fp8", fp8_scaling=scaling).double(), quantize_dequantize(weight, "fp8", fp8_scaling=scaling).double()
    )
    assert got.shape == (2, 5, 32)
    # same quantized operands: the result is the exact product rounded to bf16 (its output
    # dtype), then + bias; allow one bf16 rounding step for a different accumulation order
    expected = product.to(torch.bfloat16).float() + bias
    assert ((got - expected).abs() <= 2.0**-8 * product.abs().float() + 1e-6).all()
    print(f"fp8 _scaled_mm ({scaling}) vs exact bf16-rounded product: max |diff| {(got - expected).abs().max().item():.2e}")


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="native FP8 needs a CUDA GPU with compute capability >= 8.9 (none here)",
)
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_native_fp8_matches_emulation_on_gpu(scaling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).cuda()
    x = torch.randn(8, 64, device="cuda")
    emulated = PrecisionController(model, gauges=("fp8",), exclude=(), fp8_scaling=scaling)
    with torch.no_grad(), emulated.use("fp8"):
        expected = model(x)
    emulated.remove()
    native = PrecisionController(model, gauges=("fp8",), backend="native", exclude=(), fp8_scaling=scaling)
    with torch.no_grad(), native.use("fp8"):
        got = model(x)
    native.remove()
    # The native path hands the second layer bf16 activations, the emulation float32 ones: a bf16 rounding can move a
    # value across an FP8 (e4m3, 1/8-relative steps) bin. Measured on an H200: 2.3% of the output range (tensor scaling).
    assert (got - expected).abs().max() <= 0.04 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (10, 0)),
    reason="native NVFP4 needs a CUDA GPU with compute capability >= 10.0 (none here)",
)
def test_native_nvfp4_matches_emulation_on_gpu():
    pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128)).cuda()
    x = torch.randn(32, 64, device="cuda")
    emulated = PrecisionController(model, gauges=("nvfp4",), exclude=())
    with torch.no_grad(), emulated.use("nvfp4"):
        expected = model(x)
    emulated.remove()
    with PrecisionController(model, gauges=("nvfp4",), backend="native", exclude=()) as native, torch.no_grad():
        native.set_gauge("nvfp4")
        got = model(x).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


# ---------------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------------


def test_entropy_estimators_are_sane_and_batched():
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(2, 4096, generator=generator) * 2 - 1
    peaked = torch.randn(2, 4096, generator=generator) * 0.1
    gaussian = torch.randn(2, 4096, generator=generator)
    constant = torch.full((1, 3, 2, 8, 8), 0.7)

    h_uniform, h_peaked = histogram_entropy(uniform), histogram_entropy(peaked)
    assert h_uniform.shape == (2,) and (h_uniform > h_peaked).all()
    assert (h_uniform > 7.8).all() and (h_uniform <= 8.0).all()  # 256 bins: at most 8 bits
    assert histogram_entropy(constant).item() == 0.0
    k_uniform, k_peaked = kde_entropy(uniform), kde_entropy(peaked)
    assert (k_uniform > k_peaked).all()
    gaussian_bits = 0.5 * math.log2(2 * math.pi * math.e)  # differential entropy of N(0, 1)
    assert (kde_entropy(gaussian) - gaussian_bits).abs().max() < 0.1
    assert (histogram_entropy(gaussian, differential=True) - gaussian_bits).abs().max() < 0.1
    assert (kde_entropy(uniform) - 1.0).abs().max() < 0.1  # U(-1, 1): 1 bit

    assert wavelet_energy(constant).item() == 0.0
    video = torch.zeros(2, 3, 4, 8, 8)
    video[0, :, :, :, ::2] = 1.0  # stripes: maximal horizontal detail
    video[1] = torch.linspace(0, 1, 8)  # smooth ramp
    energy = wavelet_energy(video)
    assert energy.shape == (2,) and energy[0] > 5 * energy[1] > 0
    assert wavelet_energy(video[:, :, 0]).shape == (2,)  # images too

    with pytest.raises(ValueError, match="NaN"):
        histogram_entropy(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="bins"):
        histogram_entropy(uniform, bins=0)
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        wavelet_energy(torch.zeros(8, 8))


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_presets_encode_the_seed_and_the_sigma_schedule():
    seed = PrecisionSchedule.preset("seed")
    assert [seed(s) for s in (1.0, 0.81, 0.8, 0.6, 0.41, 0.4, 0.1, 0.0)] == [
        "nvfp4", "nvfp4", "fp16", "fp16", "fp16", "fp8", "fp8", "fp8"
    ]
    entropy_gate = PrecisionSchedule.preset("seed_entropy")
    assert entropy_gate.requires_entropy and not seed.requires_entropy
    assert [entropy_gate(0.5, h) for h in (2.0, 4.0, 7.9, 8.0, 9.0)] == ["nvfp4", "fp16", "fp16", "fp8", "fp8"]
    with pytest.raises(ValueError, match="entropy"):
        entropy_gate.select(0.5)
    noisy = torch.randn(2, 3, 4, 8, 8)
    assert 4.0 < entropy_gate.measure_entropy(noisy) < 8.0  # pure noise: high entropy, not "< 4 bits"

    sigma = PrecisionSchedule.preset("sigma")
    bits = {"nvfp4": 4, "fp8": 8, "bf16": 16}
    chosen = [bits[sigma(s)] for s in torch.linspace(1, 0, 21).tolist()]
    assert chosen == sorted(chosen) and chosen[0] == 4 and chosen[-1] == 16  # precision rises as sigma falls
    assert sigma.gauges() == ("bf16", "fp8", "nvfp4")
    assert sigma(torch.tensor([0.9, 0.9])) == "nvfp4"


def test_schedule_json_round_trip_is_exact():
    schedule = PrecisionSchedule(
        [
            PrecisionRule("nvfp4", sigma_range=(0.1 + 0.2, None), layer_gauges={"blocks.1.fc2": "bf16", "a.b": "fp8"}),
            PrecisionRule("fp8", sigma_range=(1 / 30, 0.1 + 0.2), entropy_range=(2.5, None)),
        ],
        default_gauge="bf16",
        entropy_estimator={"method": "kde", "num_samples": 256},
        name="custom",
        metadata={"note": "x", "value": 1e-300},
    )
    text = schedule.to_json_string()
    again = PrecisionSchedule.from_json_string(text)
    assert again == schedule and again.to_json_string() == text
    assert again.rules[0].sigma_range[0] == 0.1 + 0.2  # float repr round-trips exactly
    assert json.loads(json.dumps(schedule.to_dict())) == schedule.to_dict()
    for name in ("seed", "seed_entropy", "sigma"):
        preset = PrecisionSchedule.preset(name)
        assert PrecisionSchedule.from_dict(preset.to_dict()) == preset
    with pytest.raises(ValueError, match="finite"):
        PrecisionRule("fp8", sigma_range=(float("inf"), None))
    with pytest.raises(ValueError, match="unknown schedule keys"):
        PrecisionSchedule.from_dict({**schedule.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="entropy_estimator"):
        PrecisionSchedule([PrecisionRule("fp8", entropy_range=(None, 3.0))])


def test_resolve_precision(tmp_path):
    assert resolve_precision(None) is None
    assert resolve_precision("seed") == PrecisionSchedule.preset("seed")
    sigma = PrecisionSchedule.preset("sigma")
    assert resolve_precision(sigma) is sigma
    assert resolve_precision(sigma.to_dict()) == sigma
    with pytest.raises(ValueError, match="calibrated"):
        resolve_precision("calibrated")
    with pytest.raises(ValueError, match="calibrated"):
        PrecisionSchedule.preset("calibrated")
    assert resolve_precision("calibrated", calibrated=sigma.to_dict()) == sigma
    path = tmp_path / "schedule.json"
    sigma.save(path)
    assert resolve_precision(str(path)) == sigma
    with pytest.raises(ValueError, match="unknown precision spec"):
        resolve_precision("fastest")
    with pytest.raises(TypeError, match="precision spec"):
        resolve_precision(0.5)


# ---------------------------------------------------------------------------------------------
# Profiler
# ---------------------------------------------------------------------------------------------


class _ResidualMLP(nn.Module):
    """Residual MLP blocks with different gains/widths, so layer sensitivities differ."""

    def __init__(self, dim: int = 32, channels: int = 8):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.proj_in = nn.Linear(channels, dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(5)])
        self.fc1 = nn.ModuleList([nn.Linear(dim, h) for h in (64, 32, 96, 48, 64)])
        self.fc2 = nn.ModuleList([nn.Linear(h, dim) for h in (64, 32, 96, 48, 64)])
        self.gains = (0.05, 1.0, 0.3, 2.0, 0.1)
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x, sigma):
        h = self.proj_in(x) + self.time_embed(sigma.view(-1, 1, 1))
        for norm, fc1, fc2, gain in zip(self.norms, self.fc1, self.fc2, self.gains):
            h = h + gain * fc2(F.gelu(fc1(norm(h))))
        return self.proj_out(h)


def _noisy_batches(sigma: float, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        frequency = torch.rand(8, 1, 8, generator=generator) * 3
        clean = torch.sin(torch.linspace(0, 6, 16).view(1, 16, 1) * frequency)
        noisy = (1 - sigma) * clean + sigma * torch.randn(8, 16, 8, generator=generator)
        batches.append((noisy, torch.full((8,), sigma)))
    return batches


def test_profiler_ranking_predicts_measured_quantization_error():
    torch.manual_seed(0)
    model = _ResidualMLP().eval()
    with torch.no_grad():  # outliers make some layers much harder to quantize
        model.fc1[2].weight[:, 3] *= 8
        model.fc2[4].weight[5] *= 10
    sigmas = [0.9, 0.1]
    report = profile_sensitivity(model, lambda s: _noisy_batches(s, 6, seed=1), None, sigmas, gauges=("fp8", "nvfp4"))
    assert report.layers[0] == "proj_in" and "time_embed.0" not in report.layers and len(report.layers) == 11
    assert (report.sensitivity[:, 1] > report.sensitivity[:, 0]).all()  # NVFP4 always riskier than FP8

    controller = PrecisionController(model, gauges=("fp8", "nvfp4"))
    assert controller.layer_names == report.layers
    correlations = {}
    for g, gauge in enumerate(report.gauges):
        for b, sigma in enumerate(sigmas):
            held_out = _noisy_batches(sigma, 6, seed=2)  # measured on fresh data
            measured = []
            with torch.no_grad():
                references = [model(*batch) for batch in held_out]
                for name in report.layers:  # quantize this layer alone
                    controller.set_gauge("fp32", overrides={name: gauge})
                    error = sum(float((model(*batch) - ref).square().sum()) for batch, ref in zip(held_out, references))
                    measured.append(error / len(held_out))
                controller.restore()
            correlations[(gauge, sigma)] = spearmanr(report.sensitivity[:, g, b].numpy(), measured).statistic
    print("profiler Spearman rank correlations:", {k: round(v, 3) for k, v in correlations.items()})
    assert min(correlations.values()) > 0.8

    table = report.table()
    assert table.splitlines()[0].startswith("| layer | MACs |") and "`proj_in`" in table
    assert report.ranking("nvfp4")[0] == table.splitlines()[2].split("`")[1]


def test_profiler_emits_calibrated_schedules_meeting_budgets():
    torch.manual_seed(0)
    model = _ResidualMLP().eval()
    report = profile_sensitivity(model, {0.8: _noisy_batches(0.8, 2, 3), 0.2: _noisy_batches(0.2, 2, 4)}, gauges=("fp8", "nvfp4"))

    half = report.to_schedule(budget=0.5, kind="low_fraction")
    assert half.name == "calibrated" and half.metadata["low_precision_fraction"] >= 0.5
    assert [rule.sigma_range for rule in half.rules] == [(0.5, None), (None, 0.5)]
    lean = report.to_schedule(budget=6.0, kind="mean_bits")
    assert lean.metadata["mean_bits"] <= 6.0 and "nvfp4" in lean.gauges()
    tight = report.to_schedule(budget=0.5 * lean.metadata["predicted_error"], kind="max_error")
    assert tight.metadata["predicted_error"] <= 0.5 * lean.metadata["predicted_error"]
    assert tight.metadata["mean_bits"] > lean.metadata["mean_bits"]

    stored = PrecisionSchedule.from_json_string(lean.to_json_string())
    assert stored == lean and resolve_precision("calibrated", calibrated=lean.to_dict()) == lean
    controller = PrecisionController(model, gauges=stored.gauges())
    decision = controller.apply_schedule(stored, sigma=0.9)
    assert decision.rule_index == 0
    expected = {name: decision.layer_gauges.get(name, decision.gauge) for name in controller.layer_names}
    assert controller.layer_gauges == expected
    controller.remove()
    with pytest.raises(ValueError, match="kind"):
        report.to_schedule(0.5, kind="speed")
    with pytest.raises(ValueError, match="fraction"):
        report.to_schedule(1.5)
    with pytest.raises(ValueError, match="sigmas is required"):
        profile_sensitivity(model, lambda s: [], None)
