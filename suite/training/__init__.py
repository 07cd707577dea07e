"""Training one case: the case itself, the deterministic data, the one train step and loop."""
