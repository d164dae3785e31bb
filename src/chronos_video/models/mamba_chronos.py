"""Chronos-V: omni-directional complex Mamba over 3D tubelets, with a Haar-wavelet information gate.

Every block runs one selective scan (`chronos_video.ops.selective_scan`) over several orderings of
the (T, H, W) token grid at once (the orders are folded into the batch), with a complex diagonal
state matrix A = -exp(log_lambda) + i*omega: the real part sets how fast each state forgets, the
imaginary part how fast it rotates, so oscillating motion can be carried by a decaying phasor.

Design choices (see DESIGN.md, "The five systems", item 1):

* 3D RoPE inside the mixer: B_s is rotated by -theta*p_s and C_t by +theta*p_t. A scan with a
  rotating decay e^{delta(-lambda + i*omega)} equals a real-decay scan with B, C rotated by the
  accumulated phase, so rotating B/C by positional angles is exact: every C_t^T (...) B_s term picks
  up the relative 3D offset p_t - p_s, whatever the scan order. With a real state the N entries are
  rotated in pairs as in attention RoPE (B and C both by +theta*p: the real pair dot product is
  Re(conj(c) b)) and the two decays of a pair are tied, which keeps that property exact.
* Text conditioning stays linear in video tokens: cross-attention to the few text tokens
  (`ChronosAttention`, default) or the text tokens as a prefix of every scan order.
* Wavelet gate: E = mean |Haar detail| of the *input video* per tubelet (computed once per forward,
  shared by all blocks; optionally minus the detail energy expected from the noise at this
  timestep). Training multiplies the mixer's residual update and its step size delta by the soft
  mask sigmoid((E - threshold) / temperature). A token with delta = 0 is transparent to the scan
  (decay 1, no input), so at inference, where the mask is hard, dropping low-energy tokens from the
  sequence (gather, scan the shorter sequence, scatter back) computes exactly what the hard-masked
  full-length block computes (up to the local conv, which sees the kept neighbours). Skipped tokens
  still receive the cross-attention and the modulated MLP; only the mixer is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale

from ..ops.selective_scan import selective_scan
from ..ops.wavelet import GAUSSIAN_DETAIL_ENERGY, patch_detail_energy
from .attention import ChronosAttention
from .embeddings import (
    AdaLNFinalLayer,
    AdaLNZero,
    FrameConditioning,
    InputSkip,
    TextConditioning,
    TimestepConditioning,
    TubeletEmbed,
    VideoBackboneMixin,
    _as_triple,
    apply_rotary,
    check_absolute_pos_embed,
    check_prediction_type,
    modulate,
    rope_angles_3d,
)

TEXT_CONDITIONING_MODES = ("cross_attention", "scan_prefix")


def scan_orders(grid: tuple[int, int, int], num_orders: int, device: torch.device | None = None) -> torch.Tensor:
    """Scan orders over a (T, H, W) token grid as permutations of the raster token indices.

    Row `k` lists the raster indices in the order the k-th scan visits them: raster (t, h, w),
    reversed raster, spatially transposed (t, w, h) and time-major (h, w, t). `num_orders` 1, 2 or 4
    takes the first rows, so 2 is the forward/backward pair of Vim.
    """
    if num_orders not in (1, 2, 4):
        raise ValueError(f"`num_scan_orders` must be 1, 2 or 4, got {num_orders}.")
    frames, height, width = grid
    raster = torch.arange(frames * height * width, device=device).view(frames, height, width)
    orders = [
        raster.flatten(),
        raster.flatten().flip(0),
        raster.transpose(1, 2).flatten(),
        raster.permute(1, 2, 0).flatten(),
    ]
    return torch.stack(orders[:num_orders])


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """Inverse of permutations along the last dim: `x[..., order][..., inverse] == x`."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


@dataclass
class ScanRoute:
    """Everything the mixers of one forward share: which tokens they see and in which orders.

    Built once per forward by `ChronosMambaModel`, so the index arithmetic is not repeated per block.
    The mixer's sequence has `prefix_length` text tokens first, then the video tokens it processes
    (all of them, or the kept ones padded to `mixer_length - prefix_length` in gather mode).
    """

    num_orders: int
    mixer_length: int  # tokens per mixer sequence (prefix + video, padding included)
    flat_order: torch.Tensor  # (S*B*L',) indices into the (B*L') rows: sequence -> scan orders
    flat_inverse: torch.Tensor  # (S*B*L',) indices into the (S*B*L') rows: scan orders -> sequence
    step_scale: torch.Tensor | None  # (S*B, L', 1) multiplies delta (soft mask, padding = 0)
    rotation: torch.Tensor | None  # complex state: (S*B, L', N) unit phasors e^{i theta p}
    angles: torch.Tensor | None  # real state: (S*B, L', N/2) rotation angles of state pairs
    prefix_length: int = 0
    kept_index: torch.Tensor | None = None  # gather mode: (B, Lk) raster indices of the kept tokens
    kept_valid: torch.Tensor | None = None  # gather mode: (B, Lk, 1) 1 for kept tokens, 0 for padding
    update_scale: torch.Tensor | None = None  # (B, L, 1) soft or hard mask on the mixer's residual update

    def to_orders(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L', E) sequence -> (S*B, L', E), each scan order folded into the batch."""
        batch, length, channels = x.shape
        return x.reshape(batch * length, channels).index_select(0, self.flat_order).view(self.num_orders * batch, length, channels)

    def from_orders(self, y: torch.Tensor) -> torch.Tensor:
        """(S*B, L', E) scan outputs -> (S, B, L', E) back in sequence order."""
        rows, length, channels = y.shape
        restored = y.reshape(rows * length, channels).index_select(0, self.flat_inverse)
        return restored.view(self.num_orders, rows // self.num_orders, length, channels)


class OmniComplexMambaMixer(nn.Module):
    """Mamba mixer run over several scan orders at once, with a complex (or real) diagonal state.

    in_proj -> (x, z); per order: causal depthwise conv1d along the order (optional), silu,
    x-dependent delta/B/C, 3D RoPE on B/C, selective scan; back to token order; a learned,
    token-dependent softmax gate merges the orders; gated by silu(z); out_proj. Parameters are
    shared across orders: the order is what differs, which lets all orders run as one batched scan.
    """

    def __init__(
        self,
        hidden_size: int,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel_size: int = 4,
        time_step_rank: int | None = None,
        time_step_min: float = 1e-3,
        time_step_max: float = 1e-1,
        num_scan_orders: int = 4,
        complex_state: bool = True,
        use_rope: bool = True,
    ):
        super().__init__()
        self.inner_size = expand * hidden_size
        self.state_size = state_size
        self.complex_state = complex_state
        self.use_rope = use_rope
        self.num_scan_orders = num_scan_orders
        self.time_step_rank = time_step_rank or math.ceil(hidden_size / 16)
        inner, rank = self.inner_size, self.time_step_rank

        self.in_proj = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.conv1d = None
        if conv_kernel_size > 0:
            self.conv1d = nn.Conv1d(inner, inner, conv_kernel_size, groups=inner, padding=conv_kernel_size - 1)
        bc_size = 4 * state_size if complex_state else 2 * state_size  # complex B and C carry (re, im)
        self.x_proj = nn.Linear(inner, rank + bc_size, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.order_gate = nn.Linear(hidden_size, num_scan_orders) if num_scan_orders > 1 else None
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)

        # Mamba's delta initialisation: softplus(bias) log-uniform in [time_step_min, time_step_max].
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -(rank**-0.5), rank**-0.5)
            dt = torch.exp(torch.rand(inner) * (math.log(time_step_max) - math.log(time_step_min)) + math.log(time_step_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            if self.order_gate is not None:  # start as the plain average of the orders
                nn.init.zeros_(self.order_gate.weight)
                nn.init.zeros_(self.order_gate.bias)
        if complex_state:
            # S4D-Lin: A_n = -1/2 + i*pi*n, slow decay and a ladder of rotation frequencies.
            self.log_lambda = nn.Parameter(torch.full((inner, state_size), math.log(0.5)))
            self.omega = nn.Parameter(math.pi * torch.arange(state_size, dtype=torch.float32).repeat(inner, 1))
        else:
            # S4D-Real (Mamba's default) A_n = -(n + 1); with RoPE the two states of a rotated pair share a decay.
            num_decays = state_size // 2 if use_rope else state_size
            self.log_lambda = nn.Parameter(torch.log(torch.arange(1, num_decays + 1, dtype=torch.float32)).repeat(inner, 1))
            self.omega = None
        self.D = nn.Parameter(torch.ones(inner))

    def state_matrix(self) -> torch.Tensor:
        """A (inner, N): complex64 -exp(log_lambda) + i*omega, or real float32 -exp(log_lambda)."""
        decay = -torch.exp(self.log_lambda.float())
        if self.complex_state:
            return torch.complex(decay, self.omega.float())
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

    def forward(self, hidden_states: torch.Tensor, route: ScanRoute) -> torch.Tensor:
        """(B, L', D) tokens in sequence order -> (B, L', D) mixer output."""
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        x = F.silu(self._causal_conv(route.to_orders(x)))  # (S*B, L', E)
        params = self.x_proj(x)
        rank = self.time_step_rank
        delta = F.softplus(self.dt_proj(params[..., :rank]))
        if route.step_scale is not None:
            delta = delta * route.step_scale.to(delta.dtype)
        b, c = self._state_inputs(params[..., rank:], route)
        y = selective_scan(x.transpose(1, 2), delta.transpose(1, 2), self.state_matrix(), b, c, D=self.D.float())
        y = route.from_orders(y.transpose(1, 2))  # (S, B, L', E)
        if self.order_gate is None:
            merged = y[0]
        else:
            weights = self.order_gate(hidden_states).softmax(dim=-1).to(y.dtype)  # (B, L', S)
            merged = torch.einsum("sble,bls->ble", y, weights)
        return self.out_proj(merged * F.silu(z))


class ChronosMambaBlock(nn.Module):
    """AdaLN-Zero modulated omni-directional Mamba mixer, cross-attention to text, modulated MLP."""

    def __init__(
        self,
        hidden_size: int,
        mixer_kwargs: dict[str, Any],
        text_conditioning: str,
        num_attention_heads: int,
        num_kv_heads: int | None,
        qk_norm: bool,
        mlp_ratio: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = OmniComplexMambaMixer(hidden_size, **mixer_kwargs)
        if text_conditioning == "cross_attention":
            self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = ChronosAttention(
                hidden_size, num_attention_heads, num_kv_heads, cross_attention_dim=hidden_size, qk_norm=qk_norm
            )
        else:
            self.norm2 = self.cross_attn = None
        if mlp_ratio > 0:
            self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.ff = FeedForward(hidden_size, mult=mlp_ratio, activation_fn="gelu-approximate")
        else:
            self.norm3 = self.ff = None
        self.modulation = AdaLNZero(hidden_size, 6)

    def forward(self, x, conditioning, text_tokens, text_mask, route: ScanRoute):
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


class ChronosMambaModel(ModelMixin, ConfigMixin, PeftAdapterMixin, VideoBackboneMixin):
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
        text_conditioning: "cross_attention" (to the text tokens) or "scan_prefix" (text tokens
            prepended to every scan order).
        num_attention_heads, num_kv_heads, qk_norm: the cross-attention (GQA when kv heads < heads).
        mlp_ratio: MLP expansion after the mixer; 0 removes the MLP.
        text_embed_dim: hidden size of the text encoder whose states are passed in.
        use_wavelet_gate: let low-detail tubelets skip the mixer (soft in training, gathered at inference).
        gate_threshold, gate_temperature: the mask sigmoid((E - threshold) / temperature), E the
            per-tubelet mean |Haar detail| of the input video (pixel values in [-1, 1] or latents).
        gate_noise_floor: subtract the detail energy unit Gaussian noise contributes at this timestep
            (sigma * sqrt(2/pi), sigma = timestep / 1000), so the gate measures signal, not noise.
        input_skip: add a learned, conditioning-dependent per-channel multiple of the input to the
            velocity (`InputSkip`, shared with Nano-Sora); zero-initialised.
        absolute_pos_embed: add diffusers' fixed 3D sin-cos position embedding to the tokens, so the
            model knows absolute place and time as well as RoPE's relative offsets.
        text_pooling: how the text states become the AdaLN conditioning vector: "mean" over the
            tokens, or "last" (the [EOS] state, CLIP's pooled output; order-aware with a causal encoder).
        frame_conditioning: add a learned function of (text + timestep conditioning, latent frame
            index) to each frame's tokens (`FrameConditioning`), so motion words can act per frame.
        prediction_type: "velocity" (the head predicts noise - x0) or "sample" (it predicts the clean
            video x0, as JiT recommends for high-dimensional pixel tokens; `forward` still returns the
            velocity (z - x0) / sigma, so sampling and the loss are unchanged).

    Attributes:
        last_gate_stats: after each forward, {"mode": "off" | "soft" | "gather" | "mask",
            "skipped_fraction", "video_tokens", "mixer_video_tokens"} (the length the mixers ran on,
            padding of the gathered batch included).
        gate_gather: in eval mode, gather the kept tokens (default) or run the full sequence with the
            hard mask (same result, no saving; useful to check the gather path).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ChronosMambaBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm", "time_embed"]

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
    ):
        super().__init__()
        check_absolute_pos_embed(absolute_pos_embed, hidden_size)
        check_prediction_type(prediction_type)
        self._check_config(hidden_size, num_layers, state_size, expand, conv_kernel_size, num_scan_orders, complex_state,
                           use_rope, text_conditioning, mlp_ratio, gate_temperature, time_step_min, time_step_max)
        self.patch_size = _as_triple(patch_size, "patch_size")
        self.out_channels = out_channels or in_channels
        self.patch_embed = TubeletEmbed(in_channels, hidden_size, self.patch_size)
        self.time_embed = TimestepConditioning(hidden_size)
        self.text_embed = TextConditioning(text_embed_dim, hidden_size, text_pooling)
        self.frame_embed = FrameConditioning(hidden_size) if frame_conditioning else None
        mixer_kwargs = dict(state_size=state_size, expand=expand, conv_kernel_size=conv_kernel_size, time_step_rank=time_step_rank,
                            time_step_min=time_step_min, time_step_max=time_step_max, num_scan_orders=num_scan_orders,
                            complex_state=complex_state, use_rope=use_rope)
        self.blocks = nn.ModuleList(
            [
                ChronosMambaBlock(hidden_size, mixer_kwargs, text_conditioning, num_attention_heads, num_kv_heads, qk_norm, mlp_ratio)
                for _ in range(num_layers)
            ]
        )
        self.final_layer = AdaLNFinalLayer(hidden_size, self.patch_size, self.out_channels)
        if input_skip and self.out_channels != in_channels:
            raise ValueError("`input_skip` needs `out_channels` == `in_channels`.")
        self.skip_scale = InputSkip(hidden_size, in_channels) if input_skip else None
        self.gradient_checkpointing = False
        # Runtime switch (not config): in eval mode, gather the kept tokens (True) or run the full
        # sequence with the hard mask (False). Both compute the same thing; only gathering saves work.
        self.gate_gather = True
        self.last_gate_stats: dict[str, Any] | None = None

    @staticmethod
    def _check_config(hidden_size, num_layers, state_size, expand, conv_kernel_size, num_scan_orders, complex_state, use_rope,
                      text_conditioning, mlp_ratio, gate_temperature, time_step_min, time_step_max) -> None:
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("state_size", state_size), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if conv_kernel_size < 0:
            raise ValueError(f"`conv_kernel_size` must be >= 0 (0 disables the conv), got {conv_kernel_size}.")
        if num_scan_orders not in (1, 2, 4):
            raise ValueError(f"`num_scan_orders` must be 1, 2 or 4, got {num_scan_orders}.")
        if text_conditioning not in TEXT_CONDITIONING_MODES:
            raise ValueError(f"`text_conditioning` must be one of {TEXT_CONDITIONING_MODES}, got {text_conditioning!r}.")
        if use_rope:
            rope_dim = 2 * state_size if complex_state else state_size
            if rope_dim % 2 or rope_dim < 6:
                kind = "complex states >= 3" if complex_state else "an even number of real states >= 6"
                raise ValueError(f"`use_rope` needs {kind} to split rotations over (t, h, w); got `state_size`={state_size}.")
        if mlp_ratio < 0:
            raise ValueError(f"`mlp_ratio` must be >= 0, got {mlp_ratio}.")
        if gate_temperature <= 0:
            raise ValueError(f"`gate_temperature` must be > 0, got {gate_temperature}.")
        if not 0 < time_step_min <= time_step_max:
            raise ValueError(f"need 0 < `time_step_min` <= `time_step_max`, got {time_step_min}, {time_step_max}.")

    # ------------------------------------------------------------------ gate and routing
    def wavelet_energy(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Per-tubelet information energy (B, L) of the input, in raster token order."""
        energy = patch_detail_energy(hidden_states, self.patch_size).flatten(1)
        if self.config.gate_noise_floor:
            sigma = (timestep.float() / 1000.0).clamp(0.0, 1.0).to(energy.device)
            energy = energy - GAUSSIAN_DETAIL_ENERGY * sigma[:, None]
        return energy

    def _build_route(self, hidden_states, timestep, grid, text_mask) -> ScanRoute:
        config = self.config
        batch, device = hidden_states.shape[0], hidden_states.device
        num_tokens = math.prod(grid)
        num_orders = config.num_scan_orders
        prefix = text_mask.shape[1] if config.text_conditioning == "scan_prefix" else 0

        token_raster = torch.arange(num_tokens, device=device)[None]  # (1 or B, Lv) raster index per mixer video token
        token_scale = None  # (B, Lv) multiplies delta
        kept_index = kept_valid = update_scale = None
        mode, skipped = "off", 0.0
        if config.use_wavelet_gate:
            energy = self.wavelet_energy(hidden_states, timestep)
            if self.training:
                mode = "soft"
                soft = torch.sigmoid((energy - config.gate_threshold) / config.gate_temperature)
                token_scale, update_scale = soft, soft.unsqueeze(-1)
                skipped = float((soft < 0.5).float().mean())
            else:
                keep = energy > config.gate_threshold
                skipped = 1.0 - float(keep.float().mean())
                if self.gate_gather:
                    mode = "gather"
                    if not bool(keep.all()):
                        counts = keep.sum(dim=1)
                        # Kept tokens first (stable, so raster order is preserved), padded to the longest row.
                        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
                        kept_index = order[:, : int(counts.max())]
                        kept_valid = torch.gather(keep, 1, kept_index)
                        token_raster, token_scale = kept_index, kept_valid.float()
                        kept_valid = kept_valid.unsqueeze(-1)
                else:
                    mode = "mask"
                    token_scale, update_scale = keep.float(), keep.float().unsqueeze(-1)

        video_length = token_raster.shape[1]
        length = prefix + video_length
        self.last_gate_stats = {
            "mode": mode,
            "skipped_fraction": skipped,
            "video_tokens": num_tokens,
            "mixer_video_tokens": video_length,
        }
        if video_length == 0:  # every token skipped: the mixers have nothing to do
            return ScanRoute(num_orders, 0, token_raster.new_empty(0), token_raster.new_empty(0), None, None, None, prefix,
                             kept_index, kept_valid, update_scale)

        # Scan orders of the mixer sequence: text prefix first, then the video tokens ranked by each order, padding last.
        rank = invert_permutation(scan_orders(grid, num_orders, device))  # (S, L) position of each raster token in each order
        keys = rank[:, token_raster]  # (S, 1 or B, Lv)
        if kept_valid is not None:
            keys = keys.masked_fill(~kept_valid.squeeze(-1)[None], num_tokens)
        if prefix:
            text_keys = torch.arange(-prefix, 0, device=device).expand(num_orders, keys.shape[1], prefix)
            keys = torch.cat([text_keys, keys], dim=-1)
        order = torch.sort(keys, dim=-1, stable=True).indices.expand(num_orders, batch, length)
        inverse = invert_permutation(order)
        rows = torch.arange(batch, device=device)[None, :, None] * length
        flat_order = (order + rows).reshape(-1)
        flat_inverse = (inverse + rows + torch.arange(num_orders, device=device)[:, None, None] * (batch * length)).reshape(-1)

        def along_orders(values: torch.Tensor) -> torch.Tensor:  # (B, L', C) -> (S*B, L', C)
            values = values.expand(batch, length, values.shape[-1])
            return values.reshape(batch * length, -1).index_select(0, flat_order).view(num_orders * batch, length, -1)

        step_scale = None
        if token_scale is not None or (prefix and not bool(text_mask.all())):
            video_scale = token_scale if token_scale is not None else torch.ones(batch, video_length, device=device)
            parts = [text_mask.float(), video_scale] if prefix else [video_scale]
            step_scale = along_orders(torch.cat(parts, dim=1).unsqueeze(-1))

        rotation = angles = None
        if config.use_rope:
            mixer = self.blocks[0].mixer
            rope_dim = 2 * mixer.state_size if mixer.complex_state else mixer.state_size
            video_angles = rope_angles_3d(grid, rope_dim, config.rope_theta, device=device)[token_raster]  # (1 or B, Lv, n)
            if prefix:  # text tokens sit at the origin: no rotation
                text_angles = video_angles.new_zeros(video_angles.shape[0], prefix, video_angles.shape[-1])
                video_angles = torch.cat([text_angles, video_angles], dim=1)
            angles = along_orders(video_angles)
            if mixer.complex_state:
                rotation, angles = torch.polar(torch.ones_like(angles), angles), None

        return ScanRoute(num_orders, length, flat_order, flat_inverse, step_scale, rotation, angles, prefix, kept_index,
                         kept_valid, update_scale)

    # ------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predicts the flow velocity (noise - x0) of `hidden_states` (B, C, F, H, W) at `timestep` (0..1000)."""
        tokens, grid, timestep, conditioning, text_tokens, text_mask = self.embed_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_attention_mask
        )
        route = self._build_route(hidden_states, timestep, grid, text_mask)
        tokens = self.run_blocks(tokens, conditioning, text_tokens, text_mask, route)
        return self.velocity_output(tokens, grid, conditioning, hidden_states, timestep, return_dict)
