"""Entry points: the `mpbench` command (`main`), `mpbench run`'s options and its TOML config."""
