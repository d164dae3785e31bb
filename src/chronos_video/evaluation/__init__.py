"""Evaluation tools: the pixel oracle that reads shapes attributes back from generated videos, and
the held-out denoising loss used where samples are not yet informative."""

from .denoising import heldout_denoising_loss
from .oracle import ShapesOracle, format_oracle_table

__all__ = ["ShapesOracle", "format_oracle_table", "heldout_denoising_loss"]
