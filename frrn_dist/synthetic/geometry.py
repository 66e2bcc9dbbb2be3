"""The street's geometry: a pinhole camera and one frame's layout of lanes, parking, sidewalks and facades.

Imports: numpy, frrn_dist.synthetic.render.

Metres; X right, Y up, Z forward. The painters (scenery.py, objects.py) read a Street for where things go, and
layout.py queues them on it in depth order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from frrn_dist.synthetic.render import Canvas


class Camera:
    """Pinhole camera at height h above the road, looking down +Z; projects metres to pixels."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.f = width * rng.uniform(1.0, 1.15)  # Cityscapes: ~2260 px at 2048 wide
        self.cx = width / 2
        self.yh = height * rng.uniform(0.40, 0.47)  # horizon row
        self.h = rng.uniform(1.25, 1.45)  # camera height above the road
        self.height, self.width = height, width

    def p(self, x: float, y: float, z: float) -> tuple[float, float]:
        z = max(z, 0.3)
        return self.cx + self.f * x / z, self.yh + self.f * (self.h - y) / z

    def s(self, z: float) -> float:
        """Pixels per metre at depth z."""
        return self.f / max(z, 0.3)

    def ground(self, x0: float, x1: float, z0: float, z1: float):
        return [self.p(x0, 0, z0), self.p(x1, 0, z0), self.p(x1, 0, z1), self.p(x0, 0, z1)]

    def side(self, x: float, z0: float, z1: float, y0: float, y1: float):
        """A vertical quad in the plane X = x (a facade, the side of a bus)."""
        return [self.p(x, y0, z0), self.p(x, y1, z0), self.p(x, y1, z1), self.p(x, y0, z1)]

    def front(self, x0: float, x1: float, z: float, y0: float, y1: float):
        """A vertical quad in the plane Z = z (facing the camera)."""
        return [self.p(x0, y0, z), self.p(x1, y0, z), self.p(x1, y1, z), self.p(x0, y1, z)]


class Street:
    """One frame's layout (camera, strips of road, parking, sidewalk and setback) and its queue of painters."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.cam = Camera(rng, height, width)
        self.cv = Canvas(height, width)
        self.lane_w = rng.uniform(3.0, 3.5)
        self.n_left = int(rng.integers(1, 3))  # oncoming lanes
        # extra lanes in our direction; at least two lanes besides the tram's, so bus and truck can both show
        self.n_right = 1 if self.n_left == 1 else int(rng.integers(0, 2))
        self.road_l = -(0.5 + self.n_left) * self.lane_w
        self.road_r = (0.5 + self.n_right) * self.lane_w
        self.parking_w = rng.uniform(2.0, 2.6) if rng.random() < 0.5 else 0.0  # parking strip right of the road
        self.walk_w = rng.uniform(2.5, 5.0, 2)  # sidewalk widths (left, right)
        self.setback_w = rng.uniform(2.0, 7.0, 2)
        self.z_far = rng.uniform(70, 140)
        self.tram_x = -self.n_left * self.lane_w  # the leftmost lane carries the rails
        self.items: list[tuple[float, Callable[[], None]]] = []  # (depth, painter) sorted far to near

    # edges of the ground strips per side (s = -1 left, +1 right)
    def curb(self, s: int) -> float:
        return self.road_l if s < 0 else self.road_r + self.parking_w

    def walk_out(self, s: int) -> float:
        return self.curb(s) + s * self.walk_w[(s + 1) // 2]

    def facade_x(self, s: int) -> float:
        return self.walk_out(s) + s * self.setback_w[(s + 1) // 2]

    def add(self, z: float, paint: Callable[..., None], *args, **kwargs) -> None:
        """Queue `paint(*args, **kwargs)` at depth key z; layout.compose() paints the queue far to near."""
        self.items.append((z, functools.partial(paint, *args, **kwargs)))
