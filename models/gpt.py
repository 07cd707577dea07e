"""The reference GPT: a GPT-2-style decoder in one readable file.

Stands alone: imports only torch and knows nothing of hardware, precision or benchmarking.
Shapes in comments use B = batch, T = sequence length, C = n_embd, nh = heads, hs = C // nh,
V = (padded) vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# GPT-2's published shapes (Radford et al. 2019), plus a tiny model for CPU tests.
_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=512, block_size=128),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. Defaults are GPT-2 small."""

    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the position embedding covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # Round the embedding/LM-head rows up to a multiple of this (64 suits tensor cores).
    # 1 = no padding, the default, so parameter counts match GPT-2 exactly. Padded rows
    # never appear as targets and their logits are cut off before the loss.
    vocab_multiple: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "bias" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"GPTConfig.{f.name}={value!r}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_embd as a multiple of n_head"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named configuration (see `GPTConfig.presets()`), with optional overrides."""
        if name not in _PRESETS:
            raise ValueError(f"model={name!r} is unknown; choose one of {', '.join(_PRESETS)}")
        return replace(cls(**_PRESETS[name]), **overrides)

    @staticmethod
    def presets() -> list[str]:
        """Names accepted by `GPTConfig.preset`."""
        return list(_PRESETS)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Flash / memory-efficient kernels where the backend has them; causal mask built in.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's tanh GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-style language model with tied input/output embeddings."""

    def __init__(self, config: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.wte = nn.Embedding(V, config.n_embd)  # token embedding, tied to lm_head
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned positions
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (V, C) matrix
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 init from a private generator, so weights depend on `seed` alone."""
        if self.wte.weight.is_meta:
            return  # built on the meta device: shapes only, e.g. to count parameters
        gen = torch.Generator().manual_seed(seed)
        # Residual projections are scaled by 1/sqrt(2 * n_layer): two residual adds per
        # layer, so the residual stream's variance stays O(1) with depth (GPT-2 paper).
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # tied weight appears once
            if name.endswith("bias"):
                p.zero_()
            elif name.startswith(("ln_", "ln_f")) or ".ln_" in name:
                p.fill_(1.0)  # LayerNorm gain
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if self.config.padded_vocab_size == self.config.vocab_size:
            # not a view: a wrapper that hooks the output for backward (FSDP2) would lose its hook to an
            # in-place op on a view; a padded vocabulary has to slice (a copy would cost B x T x V)
            return logits
        return logits[..., : self.config.vocab_size]  # drop padded rows

    def num_params(self) -> int:
        """Number of parameters, the tied embedding counted once (GPT-2's convention)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Analytic training FLOPs per token: forward + backward, attention included.

        Counts matrix multiplies only, a multiply-add as 2 FLOPs; backward costs twice the
        forward. Per layer and token the forward does 24*C^2 in the four weight matmuls
        and 4*T*C in attention scores and the weighted sum (the full T x T matrix, as
        nanoGPT and PaLM count it, although the causal half is masked); the LM head adds
        2*C*V. So training = 6 * (matmul weights) + 12 * n_layer * C * T. Biases, norms,
        softmax and embedding lookups (under 1%) are left out.
        """
        c = self.config
        matmul_weights = c.n_layer * 12 * c.n_embd**2 + c.n_embd * c.padded_vocab_size
        return 6 * matmul_weights + 12 * c.n_layer * c.n_embd * seq_len
