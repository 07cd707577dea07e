"""`mpbench run --config FILE.toml`: the whole matrix as a file, validated like the flags.

Keys (all optional; command-line flags override them):

    models = ["tiny", "gpt2-small"]   # or model = "tiny"
    modes = ["fp32", "bf16"]          # or "all"; default: all on a GPU, the minute's worth on a CPU
    device = "auto"
    batch_size = 8
    seq_len = 128
    steps = 40
    warmup = 5
    seed = 0
    seeds = 1                         # every mode once per seed: seed, seed+1, ..., seed+seeds-1
    lr = 3e-3                         # the peak rate
    lr_schedule = "cosine"            # or "constant"
    lr_warmup = 4                     # learning-rate warm-up steps (default: a tenth of steps)
    lr_floor = 0.1                    # the last step's rate / the peak
    weight_decay = 0.1
    eval_every = 0
    compile = false
    data = "corpus.txt"
    out = "results/matrix.jsonl"
    case_timeout = 1800               # seconds per case
    fail_fast = false
    nproc = 1                         # data-parallel processes per case
    scaling = "1,2,4"                 # or a ladder of process counts
    grad_comm = "fp32"                # gradient all-reduce precision: fp32 | bf16 | fp16
    parallel = "ddp"                  # with nproc > 1: ddp | fsdp | "ddp,fsdp"
    emulate = false                   # fp8/MXFP8 on emulated kernels below their GPU capability
    numerics = false                  # tensor statistics on sampled steps (mpbench run --numerics)
    numerics_every = 10               # sample every N-th step, the first and the last (implies numerics)
    vocab_multiple = 64               # pad the vocabulary (embedding, LM head) to a multiple of this
    energy_protocol = false           # idle GPU before each case, shuffled order, repeats (docs/energy.md)
    keep_high = "last:2,lm_head"      # what the low-precision modes keep in bf16 (docs/layer-policy.md)
    fp4_recipe = "sr,rht,2d"          # the 4-bit modes' switches on, or "none"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from suite.training.case import SEED_MAX

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# key -> accepted Python types (bool is not an int here, whatever Python thinks)
KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,), "models": (list,), "modes": (list, str), "device": (str,), "batch_size": (int,),
    "seq_len": (int,), "steps": (int,), "warmup": (int,), "seed": (int,), "seeds": (int,), "lr": (float, int),
    "lr_schedule": (str,), "lr_warmup": (int,), "lr_floor": (float, int),
    "weight_decay": (float, int), "eval_every": (int,), "compile": (bool,), "data": (str,), "out": (str,),
    "case_timeout": (float, int), "fail_fast": (bool,), "nproc": (int,), "grad_comm": (str,), "scaling": (str,),
    "parallel": (str,),
    "emulate": (bool,), "numerics": (bool,), "numerics_every": (int,), "vocab_multiple": (int,),
    "energy_protocol": (bool,), "keep_high": (str,), "fp4_recipe": (str,),
}  # fmt: skip


def load_config(path: str | Path) -> dict[str, Any]:
    """The run options in a TOML file; ValueError naming the file, key, value and fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r}: no such file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"config={str(path)!r}: invalid TOML ({exc}); see the format in docs/running.md, 'Config file'"
        ) from None
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ValueError(f"config {path.name}: key {key!r} is unknown; allowed: {', '.join(KEYS)}")
        allowed = KEYS[key]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise ValueError(f"config {path.name}: {key}={value!r} must be {names}")
        if key in ("models", "modes") and isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"config {path.name}: {key}={value!r} must be a list of names")
        options[key] = value
    if "model" in options and "models" in options:
        raise ValueError(f"config {path.name}: give model or models, not both")
    if "model" in options:
        options["models"] = [options.pop("model")]
    if isinstance(options.get("modes"), list):
        options["modes"] = ",".join(options["modes"])
    return options


def seeds_type(text: str) -> int:
    """argparse type of --seeds: a whole number (its range is checked with --seed, in `seed_list`)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds={text!r} is not a whole number; give 1 or more, e.g. --seeds 5"
        ) from None


def seed_list(opts: dict[str, Any]) -> list[int]:
    """The seeds to run: --seed, --seed + 1, ..., --seed + --seeds - 1; ValueError naming a bad count."""
    seed, n = opts.get("seed", 0), opts.get("seeds", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"seeds={n!r}: must be a whole number of seeds, 1 or more; e.g. --seeds 5")
    if isinstance(seed, int) and 0 <= seed <= SEED_MAX < seed + n - 1:  # a bad --seed itself: the Case says so
        raise ValueError(
            f"seeds={n} with seed={seed}: the last seed {seed + n - 1} is past {SEED_MAX} (2^32 - 1); lower --seed "
            f"to {SEED_MAX - n + 1} or less, or give fewer --seeds"
        )
    return list(range(seed, seed + n))
