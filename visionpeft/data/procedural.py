"""Procedurally generated images: coloured shapes on textured backgrounds, rendered in batches with torch.

Every scene is drawn from a seeded ``torch.Generator``, so a (seed, size) pair always gives the same
pixels. Shapes are signed-distance functions evaluated on the pixel grid and anti-aliased over one
pixel; objects are placed in distinct cells of a grid so they never overlap and can be counted.

``pretraining_batch`` gives the label families the tiny backbones are pretrained on (shape, colour,
texture, count, quadrant of the objects' centre); ``orientation_task``, ``location_task`` and ``counting_task`` give
downstream labels those backbones never saw (an arrow's heading, a fine position grid, counting one
kind of object among distractors).
"""
from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("flat", "horizontal stripes", "vertical stripes", "checker", "noise")
#: object colours (RGB in [0, 1]); the backgrounds are kept darker and less saturated
COLOURS = torch.tensor([[0.95, 0.15, 0.15], [0.15, 0.85, 0.2], [0.2, 0.35, 1.0],
                        [0.95, 0.9, 0.15], [0.9, 0.2, 0.9], [0.15, 0.9, 0.9]])
PRETRAINING_LABELS = {"shape": len(SHAPES), "colour": len(COLOURS), "texture": len(TEXTURES), "count": 4,
                      "quadrant": 4}


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1): (y, x), each H×W."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.meshgrid(axis, axis, indexing="ij")


def _uniform(generator: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def shape_alpha(shape: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor,
                size: int) -> torch.Tensor:
    """Coverage in [0, 1] of objects (any leading dims) on a size×size grid.

    ``shape`` indexes SHAPES, or is -1 for an arrow (a long isosceles triangle pointing along ``angle``);
    ``centre`` is (..., 2) as (y, x) in [0, 1); ``radius`` and ``angle`` (radians) have the leading dims.
    """
    gy, gx = _grid(size)
    dy = gy - centre[..., 0, None, None]
    dx = gx - centre[..., 1, None, None]
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    u = cos * dx + sin * dy   # along the object's heading
    v = -sin * dx + cos * dy
    r = radius[..., None, None]
    distances = torch.stack([
        r - torch.sqrt(u * u + v * v),                                                   # circle
        0.85 * r - torch.maximum(u.abs(), v.abs()),                                      # square
        0.5 * r - torch.maximum(0.866 * v.abs() + 0.5 * u, -u),                          # triangle
        torch.maximum(torch.minimum(r - u.abs(), 0.35 * r - v.abs()),
                      torch.minimum(0.35 * r - u.abs(), r - v.abs())),                  # cross
        0.3 * r - (torch.sqrt(u * u + v * v) - 0.7 * r).abs(),                          # ring
        r - (u.abs() + v.abs()),                                                        # diamond
        torch.minimum(torch.minimum(u + 0.8 * r, 0.45 * r * (1 - u / r) - v.abs()), r - u),  # arrow
    ])
    index = torch.where(shape < 0, torch.full_like(shape, len(SHAPES)), shape)
    chosen = torch.gather(distances, 0, index[None, ..., None, None].expand(1, *distances.shape[1:]))[0]
    return (chosen * size + 0.5).clamp(0, 1)


def backgrounds(texture: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """N×3×H×W backgrounds: a dim random colour modulated by the texture of each sample (TEXTURES)."""
    n = texture.numel()
    gy, gx = _grid(size)
    base = _uniform(generator, n, 3, low=0.05, high=0.45)
    frequency = _uniform(generator, n, low=3.0, high=6.0)[:, None, None]
    phase = _uniform(generator, n, high=2 * math.pi)[:, None, None]
    patterns = torch.stack([
        torch.zeros(n, size, size),
        torch.sin(2 * math.pi * frequency * gy + phase),
        torch.sin(2 * math.pi * frequency * gx + phase),
        torch.sign(torch.sin(2 * math.pi * frequency * gx + phase) * torch.sin(2 * math.pi * frequency * gy)),
        2 * torch.rand(n, size, size, generator=generator) - 1,
    ], dim=1)
    pattern = patterns[torch.arange(n), texture]
    return (base[:, :, None, None] * (1 + 0.6 * pattern[:, None])).clamp(0, 1)


def compose(background: torch.Tensor, alphas: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Paint objects (N×K coverage maps, N×K×3 colours) over the backgrounds in order."""
    image = background
    for k in range(alphas.shape[1]):
        alpha = alphas[:, k, None]
        image = image * (1 - alpha) + colours[:, k, :, None, None] * alpha
    return image


def _cells(n: int, k: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """N×K distinct cells of a grid×grid layout (random order per sample)."""
    return torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1)[:, :k]


def _place(cells: torch.Tensor, radius: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Centres jittered inside their cells so that objects of that radius stay inside the cell."""
    row, col = cells // grid, cells % grid
    slack = (0.5 / grid - radius).clamp(min=0)
    jitter = _uniform(generator, *cells.shape, 2, low=-1.0, high=1.0) * slack[..., None]
    centre = torch.stack([row, col], dim=-1).float().add(0.5).div(grid)
    return centre + jitter


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """N×3×H×W in [0, 1] → N×H×W×3 uint8 (the layout image files use)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def pretraining_batch(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scenes of 1–4 identical objects (shape, colour) on a textured background; N×3×H×W in [0, 1] and
    labels for every family of PRETRAINING_LABELS (count − 1; quadrant of the objects' mean position)."""
    g = torch.Generator().manual_seed(seed)
    k = 4
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    texture = torch.randint(len(TEXTURES), (n,), generator=g)
    count = torch.randint(1, k + 1, (n,), generator=g)
    radius = _uniform(g, n, k, low=0.09, high=0.16)
    centre = _place(_cells(n, k, 3, g), radius, 3, g)
    angle = _uniform(g, n, k, high=2 * math.pi)
    alphas = shape_alpha(shape[:, None].expand(n, k), centre, radius, angle, size)
    alphas = alphas * (torch.arange(k)[None] < count[:, None]).float()[..., None, None]
    shade = _uniform(g, n, 1, 1, low=0.8, high=1.0)
    colours = (COLOURS[colour][:, None] * shade).expand(n, k, 3)
    images = compose(backgrounds(texture, g, size), alphas, colours)
    present = (torch.arange(k)[None] < count[:, None]).float()
    middle = (centre * present[..., None]).sum(1) / count[:, None]  # the objects are identical: their mean is defined
    quadrant = (middle[:, 0] >= 0.5).long() * 2 + (middle[:, 1] >= 0.5).long()
    return images, {"shape": shape, "colour": colour, "texture": texture, "count": count - 1, "quadrant": quadrant}


def orientation_task(n: int, seed: int, size: int = 32, bins: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One arrow of random colour, size and position; label: its heading in ``bins`` equal sectors."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(bins, (n,), generator=g)
    angle = (label.float() + _uniform(g, n, low=0.1, high=0.9)) * (2 * math.pi / bins)
    radius = _uniform(g, n, low=0.22, high=0.34)
    centre = 0.5 + _uniform(g, n, 2, low=-0.12, high=0.12)
    alpha = shape_alpha(torch.full((n,), -1), centre, radius, angle, size)
    colours = COLOURS[torch.randint(len(COLOURS), (n,), generator=g)]
    images = compose(backgrounds(torch.randint(len(TEXTURES), (n,), generator=g), g, size), alpha[:, None],
                     colours[:, None])
    return images, label


def location_task(n: int, seed: int, size: int = 32, grid: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """One small object (any shape and colour) and two larger distractor rings; label: the small object's
    cell in a grid×grid layout (row-major)."""
    g = torch.Generator().manual_seed(seed)
    radius = _uniform(g, n, low=0.06, high=0.09)
    centre = _uniform(g, n, 2, low=0.08, high=0.92)
    label = (centre[:, 0] * grid).long().clamp(max=grid - 1) * grid + (centre[:, 1] * grid).long().clamp(max=grid - 1)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    alpha = shape_alpha(shape, centre, radius, _uniform(g, n, high=2 * math.pi), size)
    distractors = shape_alpha(torch.full((n, 2), SHAPES.index("ring")), _uniform(g, n, 2, 2, low=0.1, high=0.9),
                              _uniform(g, n, 2, low=0.12, high=0.18), torch.zeros(n, 2), size)
    colours = COLOURS[torch.randint(len(COLOURS), (n, 3), generator=g)] * 0.9
    alphas = torch.cat([distractors * 0.6, alpha[:, None]], dim=1)  # the target is painted last, on top
    images = compose(backgrounds(torch.randint(len(TEXTURES), (n,), generator=g), g, size), alphas, colours)
    return images, label


def counting_task(n: int, seed: int, size: int = 32, most: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """1..``most`` red circles among 0–3 distractors (other shapes, or circles of other colours); label:
    the number of red circles − 1."""
    g = torch.Generator().manual_seed(seed)
    grid, k = 4, most + 3
    targets = torch.randint(1, most + 1, (n,), generator=g)
    distractors = torch.randint(0, 4, (n,), generator=g)
    radius = _uniform(g, n, k, low=0.075, high=0.11)
    centre = _place(_cells(n, k, grid, g), radius, grid, g)
    slot = torch.arange(k)[None]
    is_target = slot < targets[:, None]
    present = slot < (targets + distractors)[:, None]
    # a distractor differs in shape, or in colour, or both
    other_shape = torch.randint(1, len(SHAPES), (n, k), generator=g)
    other_colour = torch.randint(1, len(COLOURS), (n, k), generator=g)
    keep_circle = torch.rand(n, k, generator=g) < 0.4
    shape = torch.where(is_target | keep_circle, 0, other_shape)
    colour_index = torch.where(is_target, 0, torch.where(keep_circle, other_colour,
                                                         torch.randint(len(COLOURS), (n, k), generator=g)))
    alphas = shape_alpha(shape, centre, radius, _uniform(g, n, k, high=2 * math.pi), size) * present[..., None, None]
    images = compose(backgrounds(torch.randint(len(TEXTURES), (n,), generator=g), g, size), alphas,
                     COLOURS[colour_index])
    return images, targets - 1
