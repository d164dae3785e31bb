"""Evaluation tools: the pixel oracle that reads shapes attributes back from generated videos."""

from .oracle import ShapesOracle, format_oracle_table

__all__ = ["ShapesOracle", "format_oracle_table"]
