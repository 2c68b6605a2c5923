"""Evaluation: samplers, depth similarity, qualitative grids."""
