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


QUADRANT_CLASSES = ["north west", "north east", "south west", "south east"]
COLOUR_CLASSES = ["red", "green", "blue"]


def fitted_model(config=None, seed: int = 0, value_seed: int = 10):
    """Two tasks on ``diki-test-tiny`` with fitted statistics and random V, without training (fast).

    Task 0 "quadrants" (4 classes, default template) is fitted on ``quadrant_domain(120, 4, 1.0, 0)``,
    task 1 "colours" (3 classes, "a {} square.") on ``quadrant_domain(120, 3, -1.5, 1)``; V is random
    so that the adapters visibly change both towers on a random backbone.
    """
    from diki_model import apply_statistics, collect_statistics, create_diki_model, tensor_batches

    model = create_diki_model("diki-test-tiny", seed=seed, config=config)
    domains = [
        ("quadrants", QUADRANT_CLASSES, "a photo of a {}.", quadrant_domain(120, 4, 1.0, seed=0)),
        ("colours", COLOUR_CLASSES, "a {} square.", quadrant_domain(120, 3, -1.5, seed=1)),
    ]
    for name, classes, template, (x, y) in domains:
        task = model.add_task(name, classes, template)
        apply_statistics(model, task, collect_statistics(model, tensor_batches(x, y, 256, shuffle=False)(0)))
    with torch.no_grad():
        for _, _, layer in model.adapter_layers():
            for i, v in enumerate(layer.values):
                v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(value_seed + i)))
    model.invalidate_caches()
    return model
