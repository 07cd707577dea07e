from suite.modes.base import PrecisionMode


class FP32(PrecisionMode):
    """Strict fp32: weights, compute, grads and optimizer state in fp32, TF32 off."""

    name = "fp32"
    summary = "fp32 weights and compute, TF32 explicitly off (the reference)"
    no_fsdp = None  # FSDP2: fp32 shards, no policy
