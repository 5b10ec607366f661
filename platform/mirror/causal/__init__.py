"""Causal-effect Δ (seed 003, Li et al.): propensity-matched treatment effects per ladder
transition (``delta``), and their check against the simulator's true effects (``truth``)."""
