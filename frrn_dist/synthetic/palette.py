"""What the synthetic street is made of: Cityscapes label ids, texture weights, colour palettes, colour jitter.

Imports: numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# label ids (cityscapesscripts table); the drawing code speaks label ids, the LUTs make train ids
EGO, STATIC, GROUND, ROAD, SIDEWALK, PARKING, RAIL = 1, 4, 6, 7, 8, 9, 10
BUILDING, WALL, FENCE, GUARD_RAIL, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = 11, 12, 13, 14, 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = 24, 25, 26, 27, 28, 31, 32, 33

# texture weights (multiplicative brightness): grain (per pixel), low (smooth, ~1/8 frame), blob (leaf-sized),
# stripe (horizontal courses), lattice (diagonal mesh), ribs (vertical corrugation). Screen-space fields, computed
# once per frame and shared by every region.
TEX_NAMES = ("grain", "low", "blob", "stripe", "lattice", "ribs")


def _tex(grain=0.02, low=0.04, blob=0.0, stripe=0.0, lattice=0.0, ribs=0.0) -> tuple[float, ...]:
    return (grain, low, blob, stripe, lattice, ribs)


T_PLAIN = _tex()
T_SKY = _tex(grain=0.01, low=0.06)
T_ROAD = _tex(grain=0.07, low=0.07, blob=0.03)
T_SIDEWALK = _tex(grain=0.05, low=0.05, blob=0.02)
T_TERRAIN = _tex(grain=0.10, low=0.08, blob=0.10)
T_VEG = _tex(grain=0.06, low=0.08, blob=0.32)
T_BUILDING = _tex(grain=0.03, low=0.09, blob=0.03)
T_WALL = _tex(grain=0.03, low=0.06, stripe=0.14)
T_FENCE = _tex(grain=0.03, low=0.04, lattice=0.45)
T_METAL = _tex(grain=0.02, low=0.03)
T_CLOTH = _tex(grain=0.04, low=0.03, blob=0.04)
T_SPOKES = _tex(grain=0.05, low=0.0, lattice=0.35)
T_CARGO = _tex(grain=0.03, low=0.04, ribs=0.22)  # corrugated truck boxes


def jitter(rng: np.random.Generator, color: Sequence[float], amount: float = 14.0) -> np.ndarray:
    """`color` with Gaussian noise of `amount` grey levels per channel: no two regions share a colour exactly."""
    return np.clip(np.asarray(color, np.float32) + rng.normal(0, amount, 3), 0, 255)


def pick(rng: np.random.Generator, palette: Sequence[Sequence[float]], amount: float = 14.0) -> np.ndarray:
    """A random colour of `palette`, jittered."""
    return jitter(rng, palette[rng.integers(len(palette))], amount)


BUILDING_COLORS = [(182, 170, 150), (150, 128, 108), (122, 112, 104), (200, 196, 186), (160, 152, 140),
                   (146, 98, 82), (172, 160, 120), (132, 132, 138), (190, 160, 130)]  # fmt: skip
WINDOW_COLORS = [(45, 55, 70), (60, 70, 88), (35, 40, 48), (90, 100, 115), (150, 150, 120)]
# vehicle palettes overlap a little (white car / white truck), not much: at 1/16 scale colour and size are most
# of what tells a bus from a car. Cars are mostly unsaturated, trucks light and ribbed, buses and trams saturated.
CAR_COLORS = [(196, 198, 204), (34, 34, 38), (226, 226, 228), (110, 24, 30), (30, 44, 90), (92, 92, 98),
              (60, 60, 70), (150, 140, 120)]  # fmt: skip
TRUCK_COLORS = [(222, 222, 220), (205, 205, 200), (196, 190, 170), (176, 184, 190)]
# buses and trams overlap in shape (long boxes, window bands); their palettes barely do, and trams sit on rails
BUS_COLORS = [(232, 196, 40), (240, 150, 30), (120, 180, 60)]
TRAM_COLORS = [(200, 32, 42), (40, 140, 150), (60, 90, 170)]
CLOTH_COLORS = [(30, 32, 40), (44, 56, 92), (120, 30, 40), (200, 200, 200), (90, 90, 96), (150, 120, 80),
                (60, 90, 60), (180, 80, 40), (110, 60, 120), (40, 40, 40), (220, 190, 160)]  # fmt: skip
SKIN_COLORS = [(230, 190, 160), (200, 150, 115), (150, 105, 75), (100, 70, 50)]
HELMET_COLORS = [(235, 235, 235), (200, 30, 30), (25, 25, 25), (240, 200, 20), (30, 90, 200)]
BIKE_COLORS = [(30, 30, 30), (180, 180, 185), (200, 40, 40), (40, 80, 170), (40, 140, 80), (230, 200, 40)]
