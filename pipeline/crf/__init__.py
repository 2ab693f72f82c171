"""The dense CRF: pydensecrf, the exact torch port, its lattice, the fused and pool stages."""
