"""Running cases: the matrix runner, one spawned worker per case, faults, data parallel, max batch."""
