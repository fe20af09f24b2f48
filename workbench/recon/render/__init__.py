"""Differentiable rendering for reconstruction: rasteriser, lighting and shading."""
