"""Multi-scale (+flip) inference, tiling, memory budgets and the inference stage."""
