"""Chronos-V: omni-directional complex Mamba over 3D tubelets, with a Haar-wavelet information gate.

Every block runs one selective scan (`chronos_video.ops.selective_scan`) over several orderings of
the (T, H, W) token grid at once (the orders are folded into the batch), with a complex diagonal
state matrix A = -exp(log_lambda) + i*omega: the real part sets how fast each state forgets, the
imaginary part how fast it rotates, so oscillating motion can be carried by a decaying phasor.

Design choices:

* 3D RoPE inside the mixer: B_s is rotated by -theta*p_s and C_t by +theta*p_t. A scan with a
  rotating decay e^{delta(-lambda + i*omega)} equals a real-decay scan with B, C rotated by the
  accumulated phase, so rotating B/C by positional angles is exact: every C_t^T (...) B_s term picks
  up the relative 3D offset p_t - p_s, whatever the scan order. With a real state the N entries are
  rotated in pairs as in attention RoPE (B and C both by +theta*p: the real pair dot product is
  Re(conj(c) b)) and the two decays of a pair are tied, which keeps that property exact.
* Text conditioning stays linear in video tokens: cross-attention to the few text tokens
  (`ChronosAttention`, default) or the text tokens as a prefix of every scan order.
* Wavelet gate (`wavelet_gate.WaveletGate`): E = mean |Haar detail| of the *input video* per tubelet,
  computed once per forward and shared by all blocks. Low-energy tokens skip the mixer: softly (a
  sigmoid mask on delta and on the residual update) while a training step takes gradients, by
  gathering the kept tokens otherwise (a token with delta = 0 is transparent to the scan, so the
  soft mask tends to the gathered computation as its temperature shrinks). Skipped tokens still
  receive the cross-attention and the modulated MLP.
* Scan orders, their inverses and the RoPE angles of one forward are built once
  (`scan_route.build_scan_route`) from the grid and the gate's decision.
* Two scan forms (`scan_type`): "selective" (default, the shipped checkpoints) gives every channel and
  state its own decay and runs `ops.selective_scan`, an elementwise recurrence; "ssd" shares the decay
  within heads of `scan_head_dim` channels and keeps one rotation frequency per state, which makes the
  scan a chunked matrix computation (`ops.complex_ssd_scan`, Mamba-2's state-space duality): the
  data-dependent rotation and the 3D RoPE fold into one rotation of B and C.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin

from ..ops.selective_scan import selective_scan
from ..ops.ssd_scan import complex_ssd_scan, ssd_scan
from .attention import ChronosAttention
from .backbone import VideoBackboneMixin
from .embeddings import AdaLNZero, apply_rotary, modulate
from .scan_route import ScanRoute, build_scan_route, invert_permutation, scan_orders  # noqa: F401 (public names)
from .wavelet_gate import GateDecision, WaveletGate, tubelet_detail_energy, ungated

TEXT_CONDITIONING_MODES = ("cross_attention", "scan_prefix")
SCAN_TYPES = ("selective", "ssd")
SCAN_ROTATIONS = ("per_head", "shared")


class OmniComplexMambaMixer(nn.Module):
    """Mamba mixer run over several scan orders at once, with a complex (or real) diagonal state.

    in_proj -> (x, z); per order: causal depthwise conv1d along the order (optional), silu,
    x-dependent delta/B/C, 3D RoPE on B/C, selective scan; back to token order; a learned,
    token-dependent softmax gate merges the orders; gated by silu(z); out_proj. Parameters are
    shared across orders: the order is what differs, which lets all orders run as one batched scan.

    Takes the model's config once, as transformers' `MambaMixer` does: it reads `hidden_size`,
    `state_size`, `expand`, `conv_kernel_size`, `time_step_rank`, `time_step_min`, `time_step_max`,
    `num_scan_orders`, `complex_state`, `use_rope`, `scan_type`, `scan_head_dim`, `scan_chunk_size` and `scan_rotation`
    (see `ChronosMambaModel`). With `scan_type="ssd"` delta, the decay and the rotation frequencies are
    per head (`num_heads` = inner width / `scan_head_dim`) instead of per channel.
    """

    def __init__(self, config):
        super().__init__()
        hidden_size, state_size = config.hidden_size, config.state_size
        self.inner_size = config.expand * hidden_size
        self.state_size = state_size
        self.complex_state = config.complex_state
        self.use_rope = config.use_rope
        self.num_scan_orders = config.num_scan_orders
        self.time_step_rank = config.time_step_rank or math.ceil(hidden_size / 16)
        inner, rank = self.inner_size, self.time_step_rank
        # Configs saved before the SSD form have no scan keys: they load as the selective scan they were.
        self.scan_type = getattr(config, "scan_type", "selective")
        self.head_dim = getattr(config, "scan_head_dim", 16) if self.scan_type == "ssd" else 1
        self.num_heads = inner // self.head_dim
        self.chunk_size = getattr(config, "scan_chunk_size", 32)
        self.shared_rotation = getattr(config, "scan_rotation", "per_head") == "shared"
        step_sizes = self.num_heads if self.scan_type == "ssd" else inner  # one delta per head or per channel

        self.in_proj = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.conv1d = None
        if config.conv_kernel_size > 0:
            kernel = config.conv_kernel_size
            self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1)
        bc_size = 4 * state_size if self.complex_state else 2 * state_size  # complex B and C carry (re, im)
        self.x_proj = nn.Linear(inner, rank + bc_size, bias=False)
        self.dt_proj = nn.Linear(rank, step_sizes)
        self.order_gate = nn.Linear(hidden_size, self.num_scan_orders) if self.num_scan_orders > 1 else None
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)

        # Mamba's delta initialisation: softplus(bias) log-uniform in [time_step_min, time_step_max].
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -(rank**-0.5), rank**-0.5)
            log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(step_sizes) * (log_max - log_min) + log_min)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            if self.order_gate is not None:  # start as the plain average of the orders
                nn.init.zeros_(self.order_gate.weight)
                nn.init.zeros_(self.order_gate.bias)
        if self.scan_type == "ssd":
            # One decay per head, log-spaced over [1/2, 8] so heads keep different memories; per-state rotations
            # as S4D-Lin's ladder pi*n (complex state) or none (real state).
            heads = self.num_heads
            self.log_lambda = nn.Parameter(torch.linspace(math.log(0.5), math.log(8.0), heads))
            omega = math.pi * torch.arange(state_size, dtype=torch.float32).repeat(1 if self.shared_rotation else heads, 1)
            self.omega = nn.Parameter(omega) if self.complex_state else None
        elif self.complex_state:
            # S4D-Lin: A_n = -1/2 + i*pi*n, slow decay and a ladder of rotation frequencies.
            self.log_lambda = nn.Parameter(torch.full((inner, state_size), math.log(0.5)))
            self.omega = nn.Parameter(math.pi * torch.arange(state_size, dtype=torch.float32).repeat(inner, 1))
        else:
            # S4D-Real (Mamba's default) A_n = -(n + 1); with RoPE the two states of a rotated pair share a decay.
            num_decays = state_size // 2 if self.use_rope else state_size
            self.log_lambda = nn.Parameter(torch.log(torch.arange(1, num_decays + 1, dtype=torch.float32)).repeat(inner, 1))
            self.omega = None
        self.D = nn.Parameter(torch.ones(inner))
        self.gradient_checkpointing = False  # set with the model's by diffusers' `enable_gradient_checkpointing`

    @property
    def rope_dim(self) -> int:
        """Rotary dimension of B/C: N complex states rotate as 2N real numbers, real states in pairs."""
        return 2 * self.state_size if self.complex_state else self.state_size

    def state_matrix(self) -> torch.Tensor:
        """A (inner, N), or (num_heads, N) for the SSD form: complex64 -exp(log_lambda) + i*omega, or real
        float32 -exp(log_lambda)."""
        decay = -torch.exp(self.log_lambda.float())
        if self.scan_type == "ssd":
            decay = decay[:, None].expand(-1, self.state_size)
        if self.complex_state:
            return torch.complex(decay, self.omega.float().expand_as(decay))
        if decay.shape[1] != self.state_size:
            decay = decay.repeat_interleave(2, dim=1)
        return decay

    def _causal_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv along each scan order: (S*B, L', E) -> same shape."""
        if self.conv1d is None:
            return x
        length = x.shape[1]
        return self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)

    def _state_inputs(self, params: torch.Tensor, route: ScanRoute) -> tuple[torch.Tensor, torch.Tensor]:
        """B and C in the scan op's layout, rotated by 3D RoPE: (S*B, N, L) real or (S*B, N, 2L) interleaved."""
        n = self.state_size
        if self.complex_state:
            params = params.float()
            b = torch.complex(params[..., :n], params[..., n : 2 * n])
            c = torch.complex(params[..., 2 * n : 3 * n], params[..., 3 * n :])
            if self.use_rope:
                b = b * route.rotation.conj()  # -theta * p_s on the input side
                c = c * route.rotation  # +theta * p_t on the output side
            return torch.view_as_real(b.transpose(1, 2)).flatten(-2), torch.view_as_real(c.transpose(1, 2)).flatten(-2)
        b, c = params[..., :n], params[..., n:]
        if self.use_rope:  # real pairs: the pair dot product conjugates one side, so both turn by +theta * p
            b = apply_rotary(b, route.angles)
            c = apply_rotary(c, route.angles)
        return b.transpose(1, 2), c.transpose(1, 2)

    def _ssd_scan(self, x: torch.Tensor, delta: torch.Tensor, state_params: torch.Tensor, route: ScanRoute) -> torch.Tensor:
        """The SSD form: (S*B, L', E) inputs, (S*B, L', heads) steps -> (S*B, L', E) scan outputs (D skip included).

        Complex state: B and C are N interleaved (re, im) pairs, and the 3D RoPE angles are handed to the op,
        which adds them to the data-dependent phase and turns B and C once. Real state: RoPE turns pairs of
        B and C as in the selective form, then a real SSD.
        """
        rows, length, inner = x.shape
        heads, n = self.num_heads, self.state_size
        x_heads = x.view(rows, length, heads, self.head_dim)
        rate = -torch.exp(self.log_lambda.float())
        skip = self.D.float().view(heads, self.head_dim)
        if self.complex_state:
            b, c = state_params[..., : 2 * n].unsqueeze(2), state_params[..., 2 * n :].unsqueeze(2)
            phase = route.angles if self.use_rope else None
            clock = delta.mean(-1, keepdim=True) if self.shared_rotation else None  # the heads' mean step
            y = complex_ssd_scan(x_heads, delta, rate, b, c, omega=self.omega.float(), phase=phase, chunk_size=self.chunk_size,
                                 D=skip, rotation_dt=clock)
        else:
            b, c = state_params[..., :n], state_params[..., n:]
            if self.use_rope:
                b, c = apply_rotary(b, route.angles), apply_rotary(c, route.angles)
            y = ssd_scan(x_heads, delta, rate, b.unsqueeze(2), c.unsqueeze(2), chunk_size=self.chunk_size, D=skip)
        return y.reshape(rows, length, inner)

    def _scan_orders(self, x: torch.Tensor, route: ScanRoute) -> torch.Tensor:
        """(B, L', E) scan inputs in sequence order -> (S, B, L', E) scan outputs of every order, back in sequence order."""
        x = F.silu(self._causal_conv(route.to_orders(x)))  # (S*B, L', E)
        params = self.x_proj(x)
        rank = self.time_step_rank
        delta = F.softplus(self.dt_proj(params[..., :rank]))
        if route.step_scale is not None:
            delta = delta * route.step_scale.to(delta.dtype)
        if self.scan_type == "ssd":
            y = self._ssd_scan(x, delta, params[..., rank:], route)
        else:
            b, c = self._state_inputs(params[..., rank:], route)
            y = selective_scan(x.transpose(1, 2), delta.transpose(1, 2), self.state_matrix(), b, c, D=self.D.float()).transpose(1, 2)
        return route.from_orders(y)

    def forward(self, hidden_states: torch.Tensor, route: ScanRoute) -> torch.Tensor:
        """(B, L', D) tokens in sequence order -> (B, L', D) mixer output."""
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        if self.gradient_checkpointing and torch.is_grad_enabled() and route.num_orders > 1:
            # One order at a time, each recomputed in the backward: autograd keeps the orders' outputs, not the
            # S orders' conv, projections and scan intermediates at twice the width (the bulk of the memory).
            orders = [self._gradient_checkpointing_func(self._scan_orders, x, route.order(s)) for s in range(route.num_orders)]
            y = torch.cat(orders)  # (S, B, L', E)
        else:
            y = self._scan_orders(x, route)
        if self.order_gate is None:
            merged = y[0]
        else:
            weights = self.order_gate(hidden_states).softmax(dim=-1).to(y.dtype)  # (B, L', S)
            merged = torch.einsum("sble,bls->ble", y, weights)
        return self.out_proj(merged * F.silu(z))


class ChronosMambaBlock(nn.Module):
    """AdaLN-Zero modulated omni-directional Mamba mixer, cross-attention to text, modulated MLP."""

    def __init__(self, config):
        super().__init__()
        hidden_size = config.hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = OmniComplexMambaMixer(config)
        if config.text_conditioning == "cross_attention":
            self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = ChronosAttention(
                hidden_size, config.num_attention_heads, config.num_kv_heads, cross_attention_dim=hidden_size, qk_norm=config.qk_norm
            )
        else:
            self.norm2 = self.cross_attn = None
        if config.mlp_ratio > 0:
            self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.ff = FeedForward(hidden_size, mult=config.mlp_ratio, activation_fn="gelu-approximate")
        else:
            self.norm3 = self.ff = None
        self.modulation = AdaLNZero(hidden_size, 6)

    def forward(self, hidden_states, conditioning, text_tokens, text_mask, route: ScanRoute):
        x = hidden_states
        shift_mix, scale_mix, gate_mix, shift_mlp, scale_mlp, gate_mlp = self.modulation(conditioning)
        if route.mixer_length > 0:
            if route.kept_index is not None:  # inference gate: the mixer only sees the kept tokens
                index = route.kept_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                mixer_input = modulate(self.norm1(torch.gather(x, 1, index)), shift_mix, scale_mix)
            else:
                mixer_input = modulate(self.norm1(x), shift_mix, scale_mix)
            if route.prefix_length:  # padded text tokens enter as zeros (and with delta = 0): their content cannot leak
                prefix = self.norm1(text_tokens) * text_mask.unsqueeze(-1).to(mixer_input.dtype)
                mixer_input = torch.cat([prefix, mixer_input], dim=1)
            update = gate_mix * self.mixer(mixer_input, route)[:, route.prefix_length :]
            if route.kept_index is not None:
                x = x.scatter_add(1, index, update * route.kept_valid.to(update.dtype))
            elif route.update_scale is not None:
                x = x + update * route.update_scale.to(update.dtype)
            else:
                x = x + update
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), encoder_hidden_states=text_tokens, attention_mask=text_mask)
        if self.ff is not None:
            x = x + gate_mlp * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class ChronosMambaModel(VideoBackboneMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Velocity predictor for rectified-flow video generation (Chronos-V), linear in video tokens.

    Args:
        in_channels / out_channels: channels of the (pixel or latent) video.
        sample_frames / sample_height / sample_width: training size, used as pipeline defaults.
        patch_size: tubelet size (t, h, w).
        hidden_size, num_layers: width and depth.
        state_size: N, states per channel (complex when `complex_state`).
        expand: inner width of the mixer relative to `hidden_size`.
        conv_kernel_size: causal depthwise conv along each scan order; 0 disables it.
        time_step_rank, time_step_min, time_step_max: low-rank delta projection and its init range.
        num_scan_orders: 1 (raster), 2 (+ reversed) or 4 (+ transposed, time-major) orders per block.
        complex_state: A = -exp(log_lambda) + i*omega when True, real A = -exp(log_lambda) when False.
        use_rope: 3D RoPE on the scan's B (by -theta*p) and C (by +theta*p) for a complex state, on
            pairs of real states (both by +theta*p) otherwise; `rope_theta` its base.
        scan_type: "selective" (per-channel decays, elementwise scan; the shipped checkpoints) or "ssd"
            (decay shared within heads, per-state rotations; chunked matmul scan, see the module docstring).
        scan_head_dim: channels per SSD head (must divide `expand * hidden_size`); ignored by "selective".
        scan_rotation: "per_head" (each head turns its complex states by its own step sizes) or "shared" (one
            rotation, clocked by the heads' mean step, for all heads: B and C are turned once instead of once
            per head, about half the scan's time and memory; SSD form with complex states only).
        scan_chunk_size: steps per chunk of the SSD scan's matrix form (speed only, not the result; 32 was
            faster than 64 on CPU at 1k-16k tokens, `benchmarks/bench_ssd.py`).
        text_conditioning: "cross_attention" (to the text tokens) or "scan_prefix" (text tokens
            prepended to every scan order).
        num_attention_heads, num_kv_heads, qk_norm: the cross-attention (GQA when kv heads < heads).
        mlp_ratio: MLP expansion after the mixer; 0 removes the MLP.
        text_embed_dim: hidden size of the text encoder whose states are passed in.
        use_wavelet_gate: let low-detail tubelets skip the mixer (`WaveletGate`: soft while a training step
            takes gradients, gathered otherwise, so sampling never depends on `.training`).
        gate_threshold, gate_temperature: the mask sigmoid((E - threshold) / temperature), E the
            per-tubelet mean |Haar detail| of the input video (pixel values in [-1, 1] or latents).
        gate_noise_floor: subtract the detail energy unit Gaussian noise contributes at this timestep
            (sigma * sqrt(2/pi), sigma = timestep / 1000), so the gate measures signal, not noise.
        input_skip, absolute_pos_embed, text_pooling, frame_conditioning, prediction_type: the shared
            embeddings and output head, as documented in `NanoSoraTransformer3DModel`.

    Attributes:
        wavelet_gate: the `WaveletGate` (None without `use_wavelet_gate`); its runtime switches
            `relaxation` ("auto", "soft", "hard") and `gather` choose how the decision is applied.
        last_gate_stats: the statistics the gate returned for the latest forward, {"mode": "off" |
            "soft" | "gather" | "mask", "skipped_fraction", "video_tokens", "mixer_video_tokens"} (the
            length the mixers ran on, padding of the gathered batch included).
        gate_gather: shorthand for `wavelet_gate.gather`.
    """

    _no_split_modules = ["ChronosMambaBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        sample_frames: int = 16,
        sample_height: int = 32,
        sample_width: int = 32,
        patch_size: tuple[int, int, int] = (2, 4, 4),
        hidden_size: int = 192,
        num_layers: int = 6,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel_size: int = 4,
        time_step_rank: int | None = None,
        time_step_min: float = 1e-3,
        time_step_max: float = 1e-1,
        num_scan_orders: int = 4,
        complex_state: bool = True,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        text_conditioning: str = "cross_attention",
        num_attention_heads: int = 6,
        num_kv_heads: int | None = None,
        qk_norm: bool = True,
        mlp_ratio: float = 4.0,
        text_embed_dim: int = 128,
        use_wavelet_gate: bool = True,
        gate_threshold: float = 0.05,
        gate_temperature: float = 0.01,
        gate_noise_floor: bool = True,
        input_skip: bool = False,
        absolute_pos_embed: bool = False,
        prediction_type: str = "velocity",
        frame_conditioning: bool = False,
        text_pooling: str = "mean",
        scan_type: str = "selective",
        scan_head_dim: int = 16,
        scan_chunk_size: int = 32,
        scan_rotation: str = "per_head",
    ):
        super().__init__()
        self._check_config(self.config)
        self._init_embeddings(self.config)
        self.blocks = nn.ModuleList([ChronosMambaBlock(self.config) for _ in range(num_layers)])
        self._init_head(self.config)
        self.wavelet_gate = (
            WaveletGate(self.patch_size, gate_threshold, gate_temperature, gate_noise_floor) if use_wavelet_gate else None
        )
        self.last_gate_stats: dict[str, Any] | None = None

    @property
    def gate_gather(self) -> bool:
        return self.wavelet_gate is None or self.wavelet_gate.gather

    @gate_gather.setter
    def gate_gather(self, value: bool) -> None:
        if self.wavelet_gate is not None:
            self.wavelet_gate.gather = bool(value)

    @staticmethod
    def _check_config(config) -> None:
        for name in ("hidden_size", "num_layers", "state_size", "expand"):
            value = config[name]
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if config.conv_kernel_size < 0:
            raise ValueError(f"`conv_kernel_size` must be >= 0 (0 disables the conv), got {config.conv_kernel_size}.")
        if config.scan_type not in SCAN_TYPES:
            raise ValueError(f"`scan_type` must be one of {SCAN_TYPES}, got {config.scan_type!r}.")
        if config.scan_rotation not in SCAN_ROTATIONS:
            raise ValueError(f"`scan_rotation` must be one of {SCAN_ROTATIONS}, got {config.scan_rotation!r}.")
        for name in ("scan_head_dim", "scan_chunk_size"):
            if not isinstance(config[name], int) or config[name] < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {config[name]!r}.")
        if config.scan_type == "ssd" and (config.expand * config.hidden_size) % config.scan_head_dim:
            raise ValueError(
                f"`scan_head_dim`={config.scan_head_dim} must divide the mixer width `expand * hidden_size`="
                f"{config.expand * config.hidden_size} for `scan_type`='ssd'."
            )
        if config.num_scan_orders not in (1, 2, 4):
            raise ValueError(f"`num_scan_orders` must be 1, 2 or 4, got {config.num_scan_orders}.")
        if config.text_conditioning not in TEXT_CONDITIONING_MODES:
            raise ValueError(f"`text_conditioning` must be one of {TEXT_CONDITIONING_MODES}, got {config.text_conditioning!r}.")
        if config.use_rope:
            rope_dim = 2 * config.state_size if config.complex_state else config.state_size
            if rope_dim % 2 or rope_dim < 6:
                kind = "complex states >= 3" if config.complex_state else "an even number of real states >= 6"
                raise ValueError(f"`use_rope` needs {kind} to split rotations over (t, h, w); got `state_size`={config.state_size}.")
        if config.mlp_ratio < 0:
            raise ValueError(f"`mlp_ratio` must be >= 0, got {config.mlp_ratio}.")
        if config.gate_temperature <= 0:
            raise ValueError(f"`gate_temperature` must be > 0, got {config.gate_temperature}.")
        if not 0 < config.time_step_min <= config.time_step_max:
            raise ValueError(f"need 0 < `time_step_min` <= `time_step_max`, got {config.time_step_min}, {config.time_step_max}.")

    # ------------------------------------------------------------------ gate and routing
    def wavelet_energy(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Per-tubelet information energy (B, L) of the input, in raster token order."""
        return tubelet_detail_energy(hidden_states, timestep, self.patch_size, self.config.gate_noise_floor)

    def gate_decision(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> GateDecision:
        """Which tokens the mixers process in this forward (all of them without the gate)."""
        if self.wavelet_gate is None:
            grid_tokens = hidden_states.shape[2:]
            num_tokens = math.prod(size // patch for size, patch in zip(grid_tokens, self.patch_size))
            return ungated(num_tokens, hidden_states.device)
        return self.wavelet_gate(hidden_states, timestep, training=self.training)

    def route_for(self, decision: GateDecision, grid: tuple[int, int, int], text_mask: torch.Tensor) -> ScanRoute:
        """Scan orders, step scales and RoPE of the mixer sequences for a gate decision."""
        config = self.config
        prefix = text_mask.shape[1] if config.text_conditioning == "scan_prefix" else 0
        mixer = self.blocks[0].mixer
        rope = (mixer.rope_dim, config.rope_theta, mixer.complex_state) if config.use_rope else None
        return build_scan_route(grid, config.num_scan_orders, decision, text_mask, prefix, rope)

    def _build_route(self, hidden_states, timestep, grid, text_mask) -> ScanRoute:
        return self.route_for(self.gate_decision(hidden_states, timestep), grid, text_mask)

    def block_inputs(self, hidden_states, timestep, grid, text_mask) -> ScanRoute:
        decision = self.gate_decision(hidden_states, timestep)
        self.last_gate_stats = decision.stats  # read by benchmarks and the pipeline docs; the gate itself keeps nothing
        return self.route_for(decision, grid, text_mask)
