"""Simulated MoE routing for the demo (lplb/demo.py): drifting expert popularity, noisy batches.

Expert ``e``'s popularity is log-normal, ``p_e(t) = exp(sigma * z_e(t))``, where ``z(t)`` is a
stationary Ornstein-Uhlenbeck process: ``z(t + 1) = rho * z(t) + sqrt(1 - rho^2) * n(t)`` with
``rho = 1 - drift``, so every ``z_e`` stays standard normal while the ranking of the experts
changes slowly (after about ``1 / drift`` batches it is largely new). Each batch adds its own
noise (``batch_noise * n``, the batch's topic mix) to the log-popularity, and every token picks
its top-k experts by the Gumbel-max trick on the logits, i.e. k distinct experts drawn with
probability proportional to the batch's popularity, as a softmax router with sharp logits does.
"""

from __future__ import annotations

import math

import torch

from eplb.checks import positive_int

__all__ = ["DriftingRouting"]


def _fraction(name: str, value: float, *, upper: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= upper):
        raise ValueError(f"{name} must be in [0, {upper:g}], got {value!r}")
    return float(value)


class DriftingRouting:
    """Batches of top-k expert ids whose popularity drifts over time.

    Args:
        num_experts: E, logical experts.
        top_k: experts per token (distinct), at most E.
        tokens: tokens per batch.
        sigma: standard deviation of the log-popularity (0: all experts equally popular).
        drift: per-batch decay of the popularity's memory, in [0, 1] (0: no drift).
        batch_noise: standard deviation of each batch's own log-popularity noise.
        seed: seed of the private generator (the same seed gives the same batches).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        tokens: int,
        *,
        sigma: float = 1.0,
        drift: float = 0.01,
        batch_noise: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.num_experts = positive_int("num_experts", num_experts)
        self.top_k = positive_int("top_k", top_k, maximum=self.num_experts)
        self.tokens = positive_int("tokens", tokens)
        self.sigma = _fraction("sigma", sigma, upper=10.0)
        self.drift = _fraction("drift", drift, upper=1.0)
        self.batch_noise = _fraction("batch_noise", batch_noise, upper=10.0)
        self._gen = torch.Generator().manual_seed(seed)
        self._z = torch.randn(self.num_experts, generator=self._gen, dtype=torch.float64)

    def popularity(self) -> torch.Tensor:
        """[E] float64, the current expected share of each expert's top-k picks (sums to 1)."""
        p = torch.exp(self.sigma * self._z)
        return p / p.sum()

    def advance(self) -> None:
        """Move the popularity one batch forward in time."""
        rho = 1.0 - self.drift
        noise = torch.randn(self.num_experts, generator=self._gen, dtype=torch.float64)
        self._z = rho * self._z + math.sqrt(1.0 - rho * rho) * noise

    def batch(self) -> torch.Tensor:
        """The next batch: [tokens, top_k] int64 expert ids, distinct within a token."""
        noise = torch.randn(self.num_experts, generator=self._gen, dtype=torch.float64)
        logits = (self.sigma * self._z + self.batch_noise * noise).to(torch.float32)
        u = torch.rand(self.tokens, self.num_experts, generator=self._gen)
        # Gumbel-max: top-k of logits + Gumbel noise = k draws without replacement ~ softmax.
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-12)))
        return (logits + gumbel).topk(self.top_k, dim=1).indices
