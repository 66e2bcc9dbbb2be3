"""The region map and its rendering: every painted shape is a region (label id, object, colour, texture), and
the RGB, labelIds and instanceIds of a frame are rendered from the region map in a few vectorised numpy passes.

Imports: numpy, PIL, frrn_dist.data.labels, frrn_dist.synthetic.palette.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from frrn_dist.data.labels import ID_TO_TRAIN, INSTANCE_LABEL_IDS, NUM_CLASSES
from frrn_dist.synthetic.palette import T_PLAIN, TEX_NAMES


class Canvas:
    """Painter's-order region map. Every shape is a new region: (label id, object, colour, texture)."""

    def __init__(self, height: int, width: int):
        self.img = Image.new("I", (width, height), 0)
        self.draw = ImageDraw.Draw(self.img)
        self.labels: list[int] = [0]
        self.objects: list[int] = [-1]
        self.colors: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
        self.textures: list[tuple[float, ...]] = [(0.0,) * len(TEX_NAMES)]
        self.object_labels: list[int] = []

    def new_object(self, label: int) -> int:
        """An instance (car, person...): all its regions share the id, so windows and wheels count as the car."""
        self.object_labels.append(label)
        return len(self.object_labels) - 1

    def _region(self, label: int, color: Sequence[float], tex: Sequence[float], obj: int) -> int:
        self.labels.append(label)
        self.objects.append(obj)
        self.colors.append(tuple(float(c) for c in color))
        self.textures.append(tuple(tex))
        return len(self.labels) - 1

    def poly(self, pts, label: int, color, tex=T_PLAIN, obj: int = -1) -> None:
        self.draw.polygon([(float(x), float(y)) for x, y in pts], fill=self._region(label, color, tex, obj))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, label: int, color, tex=T_PLAIN, obj=-1) -> None:
        if rx < 0.3 and ry < 0.3:
            return
        self.draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=self._region(label, color, tex, obj))

    def line(self, pts, width: float, label: int, color, tex=T_PLAIN, obj: int = -1) -> None:
        pts = [(float(x), float(y)) for x, y in pts]
        self.draw.line(pts, fill=self._region(label, color, tex, obj), width=max(1, round(width)))


@functools.lru_cache(maxsize=4)
def _pattern_fields(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brick courses, a diagonal mesh and vertical ribs, (H, W) float32 each; they depend on the size only, so they
    are cached per worker."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    course_px = max(3.0, height / 55)  # brick/block courses: survive a 4x downscale, blur out at 16x
    mesh_px = max(3.0, height / 45)
    stripe = np.where(np.mod(y, course_px) < course_px * 0.28, -0.6, 0.4).astype(np.float32)
    diag = np.minimum(np.mod(x + y, mesh_px), np.mod(x - y, mesh_px)) < mesh_px * 0.3
    rib_px = max(3.0, height / 70)
    ribs = np.where(np.mod(x, rib_px) < rib_px * 0.3, -0.7, 0.3).astype(np.float32)
    mesh = np.where(diag, 0.6, -0.6).astype(np.float32)
    return np.broadcast_to(stripe, (height, width)), mesh, np.broadcast_to(ribs, (height, width))


def _fields(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """The shared texture fields, each (H, W) float32 with roughly unit amplitude."""

    def smooth(cell_px: float) -> np.ndarray:
        gh, gw = max(2, round(height / cell_px)) + 1, max(2, round(width / cell_px)) + 1
        coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32), mode="F")
        return np.asarray(coarse.resize((width, height), Image.BILINEAR))

    stripe, lattice, ribs = _pattern_fields(height, width)
    return {
        "grain": rng.standard_normal((height, width), dtype=np.float32),
        "low": smooth(height / 6),
        "blob": smooth(max(2.0, height / 90)),
        "stripe": stripe,
        "lattice": lattice,
        "ribs": ribs,
    }


def render(cv: Canvas, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region map -> (rgb uint8 HxWx3, labelIds uint8 HxW, instanceIds uint16 HxW)."""
    height, width = cv.img.size[1], cv.img.size[0]
    rm = np.asarray(cv.img)  # (H, W) int32 region index
    n = len(cv.labels)
    labels = np.array(cv.labels, np.uint8)
    tex = np.array(cv.textures, np.float32)

    # instance ids: id*1000+k, k counted from 0 per class over the *visible* objects in drawing order
    counts = np.bincount(rm.ravel(), minlength=n)
    objects = np.array(cv.objects, np.int64)
    visible = np.zeros(len(cv.object_labels) + 1, bool)
    np.logical_or.at(visible, objects + 1, counts > 0)
    obj_value = np.zeros(len(cv.object_labels) + 1, np.int64)
    next_k: dict[int, int] = {}
    for o, lab in enumerate(cv.object_labels):
        if lab in INSTANCE_LABEL_IDS and visible[o + 1]:
            obj_value[o + 1] = lab * 1000 + next_k.get(lab, 0)
            next_k[lab] = next_k.get(lab, 0) + 1
    region_inst = np.where(obj_value[objects + 1] > 0, obj_value[objects + 1], labels).astype(np.uint16)

    # per-frame exposure and white balance folded into the region colours: the same class never has one colour
    tint = rng.uniform(0.95, 1.05, 3) * rng.uniform(0.85, 1.1)
    colors = np.clip(np.array(cv.colors) * tint, 0, 255).astype(np.uint8)
    fields = _fields(rng, height, width)
    gain = fields["grain"] * tex[rm, 0]
    gain += 1.0
    for i, name in enumerate(TEX_NAMES[1:], start=1):
        if tex[:, i].any():
            gain += tex[rm, i] * fields[name]
    rgb = colors[rm] * gain[..., None]  # (H, W, 3) float32
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8), labels[rm], region_inst[rm]


def classes_present(cv: Canvas) -> int:
    """How many of the 19 evaluated classes have at least one pixel (from the region map alone: cheap)."""
    counts = np.bincount(np.asarray(cv.img).ravel(), minlength=len(cv.labels))
    label_pixels = np.bincount(np.array(cv.labels), weights=counts, minlength=256)
    return int(np.count_nonzero(np.bincount(ID_TO_TRAIN, weights=label_pixels, minlength=256)[:NUM_CLASSES]))
