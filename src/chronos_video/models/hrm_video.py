"""HRM-Video: a hierarchical recursive-reasoning velocity backbone with adaptive halting.

The recursive core of HRM (Wang et al. 2025) and TRM (Jolicoeur-Martineau 2025), used as the velocity
predictor of a rectified-flow model like every other chronos-video backbone: a direct-regression video
model can only return the mean clip of a prompt, a flow model samples. Inside one *segment* a low-level
module L and a high-level module H refine two token states with additive input injection,

    for each of `h_cycles`:  z_L <- L(z_L + z_H + x)  (`l_cycles` times);  z_H <- H(z_H + z_L)

where x are the embedded noisy tubelets; the output head reads z_H. Segments repeat (at most
`max_segments`) from the carry (z_H, z_L) of the previous one; a halting head on z_H says when another
segment is not worth its cost, per sample. Training uses deep supervision: every segment's velocity is
supervised, the carry is detached between segments, and the halting head learns (by BCE) whether the
next segment would still improve the flow loss, or still change the velocity (`deep_supervision_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale

from ..flow_matching import velocity_mse
from .backbone import VideoBackboneMixin, run_checkpointed
from .transformer_nanosora import NanoSoraBlock, NanoSoraTransformer3DModel

__all__ = ["GRADIENT_MODES", "HALT_CRITERIA", "HRMCarry", "HRMVideoModel", "HRMVideoModelOutput", "deep_supervision_loss"]

# "one_step": HRM's approximation, only the last L and the last H update of a segment are differentiated.
# "full_recursion": TRM's, the whole last H cycle (its `l_cycles` L updates and the H update) is.
GRADIENT_MODES: tuple[str, ...] = ("one_step", "full_recursion")
# What "the next segment is not worth it" means for the halting target (`deep_supervision_loss`):
# "loss": it lowers the flow loss by less than the fraction halt_tau (HRM/TRM's "is the answer better");
# "velocity_change": it changes the predicted velocity by less than the fraction halt_tau (the recursion
# has converged; no target needed, so the noise in the flow target does not enter the label).
HALT_CRITERIA: tuple[str, ...] = ("loss", "velocity_change")


class HRMCarry(NamedTuple):
    """The recursive state between segments (and, warm-started, between sampling steps): (B, L, D) each."""

    high: torch.Tensor
    low: torch.Tensor


@dataclass
class HRMVideoModelOutput(BaseOutput):
    """Output of [`HRMVideoModel`].

    Args:
        sample: the predicted velocity (B, C, F, H, W), read from each sample's last segment.
        carry: the final (z_H, z_L), detached; pass it back as `carry=` to warm-start the next call.
        segments: (B,) number of segments each sample ran before it halted (or hit the maximum).
        halt_logits: with `deep_supervision=True`, (B, segments) halting logits after every segment.
        segment_samples: with `deep_supervision=True`, the velocity after every segment (with gradients).
    """

    sample: torch.Tensor
    carry: HRMCarry | None = None
    segments: torch.Tensor | None = None
    halt_logits: torch.Tensor | None = None
    segment_samples: list[torch.Tensor] | None = None


class HRMReasoningModule(nn.Module):
    """A stack of DiT blocks run on `state + injection`, with an RMS-normalised output.

    The normalised output is what keeps a recursion bounded: the blocks are residual (pre-norm,
    AdaLN-Zero), so without it every injected `z_H + x` would add up across cycles and segments.
    """

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int | None, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList([NanoSoraBlock(hidden_size, num_heads, num_kv_heads, mlp_ratio, qk_norm) for _ in range(num_layers)])
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.gradient_checkpointing = False

    def forward(self, state, injection, conditioning, text_tokens, text_mask, rotary_emb) -> torch.Tensor:
        return self.norm(run_checkpointed(self, self.layers, state + injection, conditioning, text_tokens, text_mask, rotary_emb))


class HaltingHead(nn.Module):
    """One halting logit per sample from the mean of z_H and the (timestep + text) conditioning.

    Zero weight and bias -5 (HRM's initialisation): a fresh model never halts early, so training starts
    from "always run the maximum" and halting is only learned where the flow loss says it is safe.
    """

    def __init__(self, hidden_size: int, init_bias: float = -5.0):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.proj = nn.Linear(2 * hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, init_bias)

    def forward(self, z_high: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.norm(z_high.mean(dim=1)), F.silu(conditioning)], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype)).squeeze(-1).float()


class HRMVideoModel(VideoBackboneMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Hierarchical recursive-reasoning velocity predictor for rectified-flow video generation (HRM-Video).

    Embeddings (tubelets, 3D RoPE, AdaLN-Zero on timestep + pooled text, optional absolute positions and
    per-frame conditioning), the output head and the forward signature are the shared backbone's
    (`VideoBackboneMixin`); blocks are Nano-Sora's DiT blocks with text cross-attention.

    Args (beyond Nano-Sora's, see [`NanoSoraTransformer3DModel`]):
        h_layers / l_layers: DiT blocks in the H and the L module.
        h_cycles / l_cycles: H updates per segment, and L updates per H update.
        max_segments: most segments a forward runs (`max_segments=` overrides it per call).
        min_segments: segments every sample runs before the halting head is consulted.
        shared_weights: TRM's variant: one module (`l_layers` blocks) performs both updates; they
            differ only in their input (z_L + z_H + x vs. z_H + z_L). `h_layers` is then unused.
        gradient_mode: "one_step" (HRM) or "full_recursion" (TRM): which updates of a segment are
            differentiated when gradients are enabled; the others run under `torch.no_grad()`.
        halt_threshold: a sample halts once sigmoid(halting logit) exceeds this.

    `forward` also takes `carry` (warm start), `max_segments`, `halting` and `deep_supervision`, and
    returns an [`HRMVideoModelOutput`] (or `(sample,)` with `return_dict=False`, as every backbone).
    Block caches (`enable_cache`) are not supported: the recursion calls each block many times per
    forward; reuse across sampling steps is what `carry` provides.
    """

    _no_split_modules = ["NanoSoraBlock"]
    _supports_deep_supervision = True

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
        num_attention_heads: int = 6,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        text_embed_dim: int = 128,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        input_skip: bool = False,
        absolute_pos_embed: bool = False,
        prediction_type: str = "velocity",
        frame_conditioning: bool = False,
        text_pooling: str = "mean",
        h_layers: int = 2,
        l_layers: int = 2,
        h_cycles: int = 2,
        l_cycles: int = 2,
        max_segments: int = 2,
        min_segments: int = 1,
        shared_weights: bool = False,
        gradient_mode: str = "one_step",
        halt_threshold: float = 0.5,
    ):
        super().__init__()
        for name, value in (("h_layers", h_layers), ("l_layers", l_layers), ("h_cycles", h_cycles), ("l_cycles", l_cycles),
                            ("max_segments", max_segments), ("min_segments", min_segments)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if min_segments > max_segments:
            raise ValueError(f"`min_segments` ({min_segments}) must be <= `max_segments` ({max_segments}).")
        if gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"`gradient_mode` must be one of {list(GRADIENT_MODES)}, got {gradient_mode!r}.")
        if not 0.0 < halt_threshold < 1.0:
            raise ValueError(f"`halt_threshold` must be in (0, 1), got {halt_threshold}.")
        self._init_embeddings(self.config)
        module_args = (hidden_size, num_attention_heads, num_kv_heads, mlp_ratio, qk_norm)
        self.low_module = HRMReasoningModule(l_layers, *module_args)
        self.high_module = None if shared_weights else HRMReasoningModule(h_layers, *module_args)
        self.halt_head = HaltingHead(hidden_size)
        self._init_head(self.config)

    # ------------------------------------------------------------------ pieces
    block_inputs = NanoSoraTransformer3DModel.block_inputs  # the same blocks, so the same 3D RoPE

    def enable_cache(self, config) -> None:
        raise NotImplementedError(
            "HRMVideoModel calls its blocks many times per forward, so diffusers' block caches do not apply; "
            "reuse across sampling steps comes from the carry (HRMVideoPipeline(..., warm_start=True)) and halting."
        )

    def initial_carry(self, tokens: torch.Tensor) -> HRMCarry:
        """Zero states: the first L update then sees the input alone."""
        return HRMCarry(torch.zeros_like(tokens), torch.zeros_like(tokens))

    def _check_carry(self, carry, tokens: torch.Tensor) -> HRMCarry:
        if carry is None:
            return self.initial_carry(tokens)
        if not isinstance(carry, (tuple, list)) or len(carry) != 2 or not all(isinstance(c, torch.Tensor) for c in carry):
            raise ValueError("`carry` must be an HRMCarry (z_high, z_low) of two tensors, as returned in the output's `carry`.")
        for name, state in zip(("high", "low"), carry):
            if tuple(state.shape) != tuple(tokens.shape):
                raise ValueError(f"`carry.{name}` has shape {tuple(state.shape)}, this input needs (batch, tokens, hidden)={tuple(tokens.shape)}.")
        return HRMCarry(carry[0].detach().to(tokens.dtype), carry[1].detach().to(tokens.dtype))

    def run_segment(self, tokens: torch.Tensor, carry: HRMCarry, block_args: tuple) -> HRMCarry:
        """One segment of the recursion from `carry` (detached). With gradients enabled, only the updates
        `gradient_mode` names are differentiated; the rest run under `torch.no_grad()`."""
        config = self.config
        grad = torch.is_grad_enabled()
        high_module = self.high_module if self.high_module is not None else self.low_module
        z_high, z_low = carry.high.detach(), carry.low.detach()
        for h in range(config.h_cycles):
            last_cycle = h == config.h_cycles - 1
            for step in range(config.l_cycles):
                tracked = last_cycle and (config.gradient_mode == "full_recursion" or step == config.l_cycles - 1)
                with torch.set_grad_enabled(grad and tracked):
                    z_low = self.low_module(z_low, z_high + tokens, *block_args)
            with torch.set_grad_enabled(grad and last_cycle):
                z_high = high_module(z_high, z_low, *block_args)
        return HRMCarry(z_high, z_low)

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
        carry: HRMCarry | tuple[torch.Tensor, torch.Tensor] | None = None,
        max_segments: int | None = None,
        halting: bool = True,
        deep_supervision: bool = False,
    ) -> HRMVideoModelOutput | tuple[torch.Tensor]:
        """Predicts the flow velocity (noise - x0) of `hidden_states` (B, C, F, H, W) at `timestep` (0..1000).

        Args (beyond the shared backbone signature):
            carry: (z_H, z_L) to start from, e.g. the previous sampling step's `carry`; None = zeros.
            max_segments: most segments to run (default: the config's).
            halting: stop each sample once its halting head fires (after `min_segments`); False runs
                `max_segments` for every sample.
            deep_supervision: training: run `max_segments` segments without halting and return every
                segment's velocity and halting logit (carry detached between segments).
        """
        max_segments = self.config.max_segments if max_segments is None else max_segments
        if not isinstance(max_segments, int) or isinstance(max_segments, bool) or max_segments < 1:
            raise ValueError(f"`max_segments` must be a positive integer, got {max_segments!r}.")
        tokens, grid, timestep, conditioning, text_tokens, text_mask = self.embed_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_attention_mask
        )
        rotary_emb = self.block_inputs(hidden_states, timestep, grid, text_mask)
        carry = self._check_carry(carry, tokens)
        halting = bool(halting) and not deep_supervision
        batch = tokens.shape[0]
        segments = torch.zeros(batch, dtype=torch.long, device=tokens.device)
        active = torch.arange(batch, device=tokens.device)
        segment_samples, halt_logits = [], []
        for index in range(max_segments):
            everyone = active.numel() == batch
            rows = (lambda t: t) if everyone else (lambda t: t.index_select(0, active))
            block_args = (rows(conditioning), rows(text_tokens), rows(text_mask), rotary_emb)
            state = self.run_segment(rows(tokens), HRMCarry(rows(carry.high), rows(carry.low)), block_args)
            carry = state if everyone else HRMCarry(*(c.index_copy(0, active, s) for c, s in zip(carry, state)))
            segments[active] += 1
            if deep_supervision:
                segment_samples.append(self._velocity(state.high, grid, conditioning, hidden_states, timestep))
                # a read-out: the halting BCE must not steer the states or the (timestep + text) vector
                halt_logits.append(self.halt_head(state.high.detach(), conditioning.detach()))
            elif halting and index + 1 >= self.config.min_segments and index + 1 < max_segments:
                halt = torch.sigmoid(self.halt_head(state.high, block_args[0])) > self.config.halt_threshold
                active = active[~halt]
                if active.numel() == 0:
                    break
        sample = segment_samples[-1] if deep_supervision else self._velocity(carry.high, grid, conditioning, hidden_states, timestep)
        if not return_dict:
            return (sample,)
        return HRMVideoModelOutput(
            sample=sample,
            carry=HRMCarry(carry.high.detach(), carry.low.detach()),
            segments=segments,
            halt_logits=torch.stack(halt_logits, dim=1) if deep_supervision else None,
            segment_samples=segment_samples if deep_supervision else None,
        )

    def _velocity(self, z_high, grid, conditioning, hidden_states, timestep) -> torch.Tensor:
        return self.velocity_output(z_high, grid, conditioning, hidden_states, timestep, return_dict=False)[0]


def deep_supervision_loss(
    output: HRMVideoModelOutput,
    target: torch.Tensor,
    sigmas: torch.Tensor | None = None,
    weighting_scheme: str = "logit_normal",
    halt_tau: float = 0.01,
    halt_loss_weight: float = 0.5,
    halt_criterion: str = "loss",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow loss averaged over the segments of a `deep_supervision=True` forward, plus the halting BCE.

    The halting target after segment s is 1 ("stop") when segment s + 1 lowers that sample's flow loss
    by less than the fraction `halt_tau` (`halt_criterion="loss"`), or changes its predicted velocity by
    less than that fraction (RMS of the change over RMS of the new velocity, `"velocity_change"`),
    measured on this very batch (no second forward pass, as in TRM). The last segment has no successor
    and no halting target. Returns (loss, float statistics).
    """
    if halt_criterion not in HALT_CRITERIA:
        raise ValueError(f"`halt_criterion` must be one of {list(HALT_CRITERIA)}, got {halt_criterion!r}.")
    if not output.segment_samples:
        raise ValueError("`output` has no `segment_samples`; run the model with `deep_supervision=True`.")
    per_sample = torch.stack([velocity_mse(sample, target) for sample in output.segment_samples], dim=1)  # (B, S)
    if sigmas is not None:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        per_sample = per_sample * compute_loss_weighting_for_sd3(weighting_scheme, sigmas).to(per_sample.device).view(-1, 1)
    flow = per_sample.mean()
    stats = {f"flow_loss_segment_{s}": float(per_sample[:, s].detach().mean()) for s in range(per_sample.shape[1])}
    # a halting head without a loss term still joins the graph, so DDP sees every parameter used
    loss = flow + 0.0 * output.halt_logits.sum() if output.halt_logits is not None else flow
    if per_sample.shape[1] > 1 and halt_loss_weight > 0:
        with torch.no_grad():
            if halt_criterion == "loss":
                before, after = per_sample[:, :-1], per_sample[:, 1:]
                change = (before - after) / before.clamp_min(1e-12)
            else:
                samples = [sample.detach().float().flatten(1) for sample in output.segment_samples]
                change = torch.stack([(new - old).norm(dim=1) / new.norm(dim=1).clamp_min(1e-12)
                                      for old, new in zip(samples[:-1], samples[1:])], dim=1)
            halt_target = (change < halt_tau).float()
        logits = output.halt_logits[:, :-1]
        halt = F.binary_cross_entropy_with_logits(logits, halt_target)
        loss = flow + halt_loss_weight * halt
        predicted = (logits.detach() > 0).float()
        stats.update(halt_loss=float(halt.detach()), halt_target_rate=float(halt_target.mean()), halt_accuracy=float((predicted == halt_target).float().mean()))
    return loss, stats
