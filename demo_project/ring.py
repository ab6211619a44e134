"""The reference P (8 Gaussians on a ring, exact density) and the model Q (a mixture)."""

from __future__ import annotations

import math

import torch
from torch import nn


class Ring:
    """Equal mixture of ``modes`` isotropic Gaussians (σ = ``sigma``) on a circle.

    Args:
        modes: number of modes K.
        radius: radius of the circle.
        sigma: standard deviation of each mode.
    """

    def __init__(self, modes: int = 8, radius: float = 4.0, sigma: float = 0.25) -> None:
        angles = torch.arange(modes, dtype=torch.float32) * (2 * math.pi / modes)
        self.means = radius * torch.stack((angles.cos(), angles.sin()), dim=1)
        self.sigma = sigma
        self.modes = modes

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        means = self.means.to(x.device)
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        log_comp = -sq / (2 * self.sigma**2) - 2 * math.log(self.sigma) - math.log(2 * math.pi)
        return torch.logsumexp(log_comp, dim=1) - math.log(self.modes)

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples and the index of the mode each came from."""
        mode = torch.randint(self.modes, (n,), generator=generator)
        x = self.means[mode] + self.sigma * torch.randn(n, 2, generator=generator)
        return x, mode

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, self.means.to(x.device)).argmin(dim=1)

    def modes_covered(self, x: torch.Tensor) -> tuple[int, float]:
        """Modes covered and the high-quality fraction, as in the mode-collapse literature.

        A sample is high quality when it lies within 3σ of its nearest mode; a mode is
        covered when at least one high-quality sample is nearest to it.
        """
        dist = torch.cdist(x, self.means.to(x.device))
        nearest, idx = dist.min(dim=1)
        good = nearest < 3 * self.sigma
        return int(idx[good].unique().numel()), float(good.float().mean())


class GaussianMixture(nn.Module):
    """Learnable mixture of ``components`` isotropic Gaussians in 2-D.

    Both its log-density and its samples are available, so it can be trained by
    maximum likelihood (forward KL) or on its own samples (reverse KL).
    """

    def __init__(self, components: int = 8, init_scale: float = 3.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.means = nn.Parameter(2.5 * torch.randn(components, 2, generator=g))
        self.log_scales = nn.Parameter(torch.full((components,), math.log(init_scale)))
        self.logits = nn.Parameter(torch.zeros(components))

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.log_scales.exp()
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        return -sq / (2 * scales**2) - 2 * self.log_scales - math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        log_w = torch.log_softmax(self.logits, dim=0)
        return torch.logsumexp(self.component_log_prob(x) + log_w, dim=1)

    def sample(self, n: int) -> torch.Tensor:
        comp = torch.multinomial(torch.softmax(self.logits, 0), n, replacement=True)
        eps = torch.randn(n, 2, device=self.means.device)
        return self.means[comp] + self.log_scales.exp()[comp, None] * eps

    def reverse_kl_loss(self, log_p, samples_per_component: int = 64) -> torch.Tensor:
        """E_Q[log q − log p], reparameterised per component, exact over the mixture weights."""
        k = self.means.shape[0]
        eps = torch.randn(k, samples_per_component, 2, device=self.means.device)
        y = self.means[:, None, :] + self.log_scales.exp()[:, None, None] * eps
        f = (self.log_prob(y.reshape(-1, 2)) - log_p(y.reshape(-1, 2))).reshape(k, -1).mean(1)
        return (torch.softmax(self.logits, 0) * f).sum()
