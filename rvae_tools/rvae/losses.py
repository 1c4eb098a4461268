"""KL terms and likelihoods of the rVAE objective (all in nats, per window).

The loss minimised in training is the negative ELBO

    sum_k q(k|x) [ -log p(x | z, theta_k, d) + beta * KL(q(theta|k,x) || p(theta|k)) ]
    + beta * [ KL(q(k|x) || p(k)) + KL(q(z|x) || N(0, I)) + KL(q(d|x) || N(0, s_d^2 I)) ]

with k running over the rotation components (one for the plain encoders) and beta the KL
weight (annealed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def kl_normal(mu: torch.Tensor, logsd: torch.Tensor, prior_mu: float | torch.Tensor = 0.0,
              prior_sd: float | torch.Tensor = 1.0) -> torch.Tensor:
    """KL(N(mu, e^logsd^2) || N(prior_mu, prior_sd^2)) elementwise."""
    prior_sd = torch.as_tensor(prior_sd, dtype=mu.dtype, device=mu.device)
    var_ratio = torch.exp(2 * logsd) / prior_sd ** 2
    return torch.log(prior_sd) - logsd + 0.5 * (var_ratio + (mu - prior_mu) ** 2 / prior_sd ** 2) - 0.5


def kl_uniform_angle(logsd: torch.Tensor) -> torch.Tensor:
    """KL of a narrow normal angle posterior to the uniform distribution on the circle.

    Exact for the wrapped normal as its spread goes to zero: log(2 pi) minus its entropy.
    """
    return LOG_2PI - (0.5 * (LOG_2PI + 1) + logsd)


def kl_categorical(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || exp(log_prior)) over the last axis."""
    logq = torch.log_softmax(logits, dim=-1)
    return (logq.exp() * (logq - log_prior)).sum(-1)


def rotation_log_prior(rotations: int, prior: str, width: float) -> torch.Tensor:
    """log p(k) of the discrete rotation components: uniform, or a normal of ``width`` rad around 0."""
    if prior == "uniform" or rotations == 1:
        return torch.full((rotations,), -math.log(rotations))
    c = torch.arange(rotations, dtype=torch.float64) * (2 * math.pi / rotations)
    c = torch.remainder(c + math.pi, 2 * math.pi) - math.pi
    return torch.log_softmax(-0.5 * (c / width) ** 2, dim=0).float()


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sd: float | torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log N(x | mean, sd^2) summed over the last two (pixel) axes; ``mask`` drops missing pixels."""
    sd = torch.as_tensor(sd, dtype=mean.dtype, device=mean.device)
    sq = mean - x
    # Squared in place where nothing needs the difference for a gradient (encoding): one
    # (B, r, H, W) temporary fewer.
    sq = sq.square() if sq.requires_grad else sq.square_()
    if mask is None:
        count = x.shape[-1] * x.shape[-2]
    else:
        sq = sq * mask
        count = mask.sum((-2, -1))
    return sq.sum((-2, -1)) * (0.5 / sd ** 2) + count * (torch.log(sd) + 0.5 * LOG_2PI)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of intensities in [0, 1] against decoded logits, summed over pixels."""
    x = x.expand_as(logits)
    nll = F.binary_cross_entropy_with_logits(logits, x.clamp(0, 1), reduction="none")
    if mask is not None:
        nll = nll * mask
    return nll.sum((-2, -1))
