"""Evaluation tools: the pixel oracle that reads shapes attributes back from generated videos, and
the held-out denoising loss used where samples are not yet informative, and the caption-swap
loss gap that tells whether a model uses a caption attribute at all."""

from .denoising import caption_swap_loss_gap, caption_swap_loss_gaps, heldout_denoising_loss, swapped_attribute
from .oracle import ShapesOracle, format_oracle_table

__all__ = ["ShapesOracle", "caption_swap_loss_gap", "caption_swap_loss_gaps", "format_oracle_table", "heldout_denoising_loss", "swapped_attribute"]
