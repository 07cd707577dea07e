"""asv benchmarks for mpbench (see bench_matrix.py). Importing this costs nothing."""
