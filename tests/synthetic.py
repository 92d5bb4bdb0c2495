"""Small synthetic image domains for model-level tests (no files, no downloads)."""

import torch


def quadrant_domain(n: int, num_classes: int, background: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = a bright patch in position c; the background level sets the distribution."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.2 + background
    for c in range(num_classes):
        r, col = divmod(c, 2)
        rows = (y == c).nonzero().flatten()
        x[rows, :, r * 16 : r * 16 + 16, col * 16 : col * 16 + 16] += 2.5
    return x, y
