"""A case: one model trained in one precision mode with one set of sizes. Validated on creation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch

from models import GPTConfig
from suite.hardware import concrete_device
from suite.modes import MODES
from suite.policy import resolve_fp4_recipe, resolve_keep_high
from suite.training.schedule import DEFAULT_FLOOR, DEFAULT_SCHEDULE, SCHEDULES, LRSchedule, default_warmup

GRAD_COMM = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")  # DistributedDataParallel, or FSDP2 sharding
# Peak learning rates by model size, from the GPT-3 paper's table (tiny: chosen to learn
# visibly within a few dozen steps).
DEFAULT_LR = {"tiny": 3e-3, "gpt2-small": 6e-4, "gpt2-medium": 3e-4, "gpt2-large": 2.5e-4, "gpt2-xl": 2e-4}
# Seeds a torch generator takes once the data's split streams are derived from them (seed x 1,000,003 + split
# must stay within 64 bits): numpy's range, which any user's seed fits in.
SEED_MAX = 2**32 - 1
TOKEN_BYTES = 8  # batches are int64 token ids


@dataclass(frozen=True)
class Case:
    """Everything that defines one training run. Invalid values raise ValueError naming the field."""

    model: str = "tiny"
    mode: str = "fp32"
    # given as auto | cpu | cuda | cuda:N; held as the concrete "cpu" or "cuda:N" (auto: GPU 0 when
    # torch sees one), so nothing downstream reads a user's device name. With nproc > 1 the ranks
    # of a node use consecutive GPUs from this one.
    device: str = "auto"
    batch_size: int = 8
    seq_len: int = 128
    steps: int = 40  # optimizer steps in total, warm-up included
    warmup: int = 5  # first steps left out of timing (they still train)
    seed: int = 0  # initial weights and batch order
    compile: bool = False  # torch.compile the model after the mode prepares it
    data: str | None = None  # None: the synthetic Markov corpus; else a file path
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR of the model
    lr_schedule: str = DEFAULT_SCHEDULE  # cosine (linear warm-up, cosine decay to lr_floor) | constant
    lr_warmup: int | None = None  # steps of learning-rate warm-up; None: a tenth of the steps (not `warmup`)
    lr_floor: float = DEFAULT_FLOOR  # the last step's rate as a fraction of the peak (cosine)
    weight_decay: float = 0.1
    eval_batches: int = 4  # held-out batches for final_loss
    eval_every: int = 0  # also evaluate every N steps (0: only at the end)
    nproc: int = 1  # data-parallel processes; batch_size is per process
    grad_comm: str = "fp32"  # gradient all-reduce precision under data parallelism: fp32 | bf16 | fp16
    fidelity: bool = False  # also compare step 1 with a float64 reference (mpbench run --fidelity)
    # how the processes share the model: ddp | fsdp; None: ddp with nproc > 1, none with 1. Named with
    # nproc 1, a one-rank torchrun job: the data-parallel code path on one device (a first GPU's check)
    parallel: str | None = None
    emulate: bool = False  # run fp8/MXFP8 modes with emulated kernels on a GPU below their capability
    # tensor statistics every N steps (plus the first and the last), untimed (mpbench run --numerics); 0: off.
    # Not in the case key: a sampled step trains exactly as an unsampled one (tests prove it)
    numerics_every: int = 0
    # round the vocabulary (embedding and LM head rows) up to a multiple of this (64 suits tensor cores);
    # 1: GPT-2's 50257 as published (mpbench run --vocab-multiple)
    vocab_multiple: int = 1
    # which repeat of the energy protocol this case is (1, 2, ...; mpbench run --energy-protocol); 0: not one
    repeat: int = 0
    # what a low-precision mode keeps in bf16 (suite/policy.py; mpbench run --keep-high): "" for the mode's
    # default. Held resolved ("last:15%" of 12 blocks is "last:2"); "" for a mode that takes no policy
    keep_high: str = ""
    # the 4-bit modes' switches (suite/policy.py; mpbench run --fp4-recipe): "" for the mode's default; held
    # resolved ("sr,rht,2d"); "" for every other mode
    fp4_recipe: str = ""

    def __post_init__(self) -> None:
        if self.model not in GPTConfig.presets():
            raise ValueError(f"model={self.model!r} is unknown; choose one of {', '.join(GPTConfig.presets())}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; choose from {', '.join(MODES)}")
        object.__setattr__(self, "device", concrete_device(self.device))  # frozen: set once, here
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{f.name}={value!r}: must be an integer")
        if self.grad_comm not in GRAD_COMM:
            raise ValueError(f"grad_comm={self.grad_comm!r} is unknown; choose one of {', '.join(GRAD_COMM)}")
        if self.parallel is not None and self.parallel not in PARALLEL:
            raise ValueError(f"parallel={self.parallel!r} is unknown; choose one of {', '.join(PARALLEL)}")
        for name in ("batch_size", "seq_len", "steps", "eval_batches", "nproc", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.repeat < 0:
            raise ValueError(f"repeat={self.repeat}: must be 0 (not an energy-protocol repeat) or 1, 2, ...")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every}: must be 0 (only at the end) or a positive step count")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(
                f"warmup={self.warmup}: must be in 0..steps-1 (steps={self.steps}) so that some steps are timed"
            )
        if self.compile and self.warmup < 2:
            raise ValueError(
                f"warmup={self.warmup}: --compile needs --warmup 2 or more, so that compilation (first step) "
                "and recompilation (second) stay out of the timed window"
            )
        block = self.model_config.block_size
        if self.seq_len > block:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the block size {block} of model {self.model!r}; "
                f"use --seq-len {block} or less"
            )
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed={self.seed}: must be in 0..{SEED_MAX} (2^32 - 1)")
        # inf and nan would train and end `diverged`: a failed case for what is bad input
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}: must be a positive finite number, such as 3e-4")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.lr_warmup is not None and (isinstance(self.lr_warmup, bool) or not isinstance(self.lr_warmup, int)):
            raise ValueError(f"lr_warmup={self.lr_warmup!r}: must be an integer number of steps")
        if self.lr_warmup is not None and self.lr_schedule == "constant":
            raise ValueError(
                f"lr_warmup={self.lr_warmup}: only the cosine schedule warms up; drop --lr-warmup or use "
                "--lr-schedule cosine"
            )
        if self.lr_warmup is not None and not 0 < self.lr_warmup <= self.steps - 2:
            raise ValueError(
                f"lr_warmup={self.lr_warmup}: must be in 1..steps-2 (steps={self.steps}), so that after the peak's "
                "step the rate decays to the floor by the last step"
            )
        if isinstance(self.lr_floor, bool) or not (isinstance(self.lr_floor, int | float) and 0 <= self.lr_floor <= 1):
            raise ValueError(f"lr_floor={self.lr_floor}: must be a fraction of the peak rate in 0..1, such as 0.1")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay={self.weight_decay}: must be zero or a positive finite number, such as 0.1")
        self._check_numerics()
        # frozen: set once, here; ValueError naming the field for a policy or switch the case cannot have
        n_layer = self.model_config.n_layer
        object.__setattr__(self, "keep_high", resolve_keep_high(self.mode, self.keep_high, n_layer))
        object.__setattr__(self, "fp4_recipe", resolve_fp4_recipe(self.mode, self.fp4_recipe))

    def _check_numerics(self) -> None:
        """--numerics: a step count, on one plain process, leaving some step of the timed window unsampled."""
        n = self.numerics_every
        if n < 0:
            raise ValueError(f"numerics_every={n}: must be 0 (off) or a positive step count, such as 10")
        if not n:
            return
        if self.compile:
            raise ValueError(
                f"numerics_every={n} with compile=True: the statistics hooks are not supported on a torch.compile'd "
                "model (they would be traced into its graphs or break them); drop --compile or --numerics"
            )
        if self.data_parallel:
            raise ValueError(
                f"numerics_every={n} with nproc={self.nproc}, parallel={self.data_parallel!r}: statistics of per-rank "
                "shards (DDP/FSDP2) are not supported; use --nproc 1 without --parallel, or drop --numerics"
            )
        from suite.metrics.window import PROFILED_STEPS  # here: the case module stays light to import
        from suite.training.numerics import timed_steps_left

        # the timed window: after warm-up, before the steps a GPU keeps for the profiler
        on_gpu = torch.device(self.device).type == "cuda"  # the concrete device, parsed, not matched
        reserved = PROFILED_STEPS if on_gpu and self.steps - self.warmup > PROFILED_STEPS else 0
        window = range(self.warmup + 1, self.steps - reserved + 1)
        if not timed_steps_left(n, self.steps, window):
            raise ValueError(
                f"numerics_every={n} with steps={self.steps}, warmup={self.warmup}: samples every timed step "
                f"({window.start}..{window.stop - 1}), leaving none to time; use a larger --numerics-every or more "
                "--steps"
            )

    @property
    def model_config(self) -> GPTConfig:
        return GPTConfig.preset(self.model, vocab_multiple=self.vocab_multiple)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]

    @property
    def schedule(self) -> LRSchedule:
        """The rate of every step; a constant schedule records no warm-up and no floor."""
        if self.lr_schedule == "constant":
            return LRSchedule("constant", self.learning_rate, self.steps, 0, 1.0)
        warmup = self.lr_warmup if self.lr_warmup is not None else default_warmup(self.steps)
        return LRSchedule(self.lr_schedule, self.learning_rate, self.steps, warmup, float(self.lr_floor))

    @property
    def data_parallel(self) -> str | None:
        """ "ddp" or "fsdp" when the case trains through torchrun ranks (any nproc), None for one plain process."""
        return self.parallel or ("ddp" if self.nproc > 1 else None)

    @property
    def batch_bytes(self) -> int:
        """Bytes of the token batches one process builds before training: every step's and the
        held-out ones, (steps + eval_batches) x rows x (seq_len + 1) int64; a data-parallel
        process builds the global batches (every rank's rows)."""
        rows = self.batch_size * self.nproc
        return (self.steps + self.eval_batches) * rows * (self.seq_len + 1) * TOKEN_BYTES

    def check_batches_fit(self) -> None:
        """ValueError when the batches alone exceed this machine's physical memory: steps or a batch size
        that no run here could hold (1e12 steps, say). What merely runs short of memory is an `oom` record."""
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # a platform that does not say: nothing to check against
            return
        if self.batch_bytes > ram:
            raise ValueError(
                f"steps={self.steps}, batch_size={self.batch_size}: the token batches built before training take "
                f"{self.batch_bytes / 2**30:,.1f} GiB, more than this machine's {ram / 2**30:,.1f} GiB of RAM; "
                "use fewer --steps or a smaller --batch-size"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all processes (the global batch)."""
        return self.batch_size * self.seq_len * self.nproc
