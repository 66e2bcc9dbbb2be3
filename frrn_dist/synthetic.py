"""Synthetic Cityscapes: procedurally drawn street scenes written in the official folder layout.

    python -m frrn_dist.synthetic --out data/synthetic --hw 256x512 --train 60 --val 20

Every frame is a small 3D street seen through a pinhole camera (horizon, vanishing point, objects shrinking with
depth) and painted back to front: sky, a backdrop at the end of the street, road with lane markings, sidewalks,
terrain, facades with windows, walls and fences, trees, poles with signs and lights, people, riders on bicycles and
motorcycles, cars, trucks, buses and trams on rails, plus void ids (ego vehicle, static, parking, rail track, guard
rail). Each drawn shape is one "region" with a label id, an optional instance object, a base colour and texture
weights; the RGB is rendered from the region map in a few vectorised numpy passes, so a 2048x1024 frame takes a
fraction of a second. Every frame contains all 19 evaluated classes (a frame that loses one to occlusion is redrawn
with the next sub-seed), so even a 4-frame val set scores every class.

Sizes are in metres and projected, so the same scene scales to any --hw. Thin classes are drawn fatter than in
reality (poles 0.35-0.5 m) and kept near (people, riders, poles within ~20 m) so that they stay 3-4 pixels wide
after the 8-16x downscale the CPU demo trains at.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from frrn_dist.data.labels import ID_COLORS, ID_TO_TRAIN, INSTANCE_LABEL_IDS, NUM_CLASSES

TRAIN_CITIES = (
    "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover",
    "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm", "weimar", "zurich",
)  # fmt: skip
VAL_CITIES = ("frankfurt", "lindau", "munster")
MARKER_NAME = "synthetic.json"  # parameters, and "complete": true once every frame is written
GENERATOR = "frrn_dist.synthetic/1"  # bump when the drawing changes, so old datasets are redrawn, not reused
FRAME_ID = 19  # Cityscapes annotates the 20th frame of every 30-frame snippet: <city>_<seq>_000019

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


# --------------------------------------------------------------------------------------------------------------------
# Drawing: a region map painted with PIL, then rendered to RGB / labelIds / instanceIds


class _Canvas:
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


def _render(cv: _Canvas, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------------------------------------
# The street: camera, layout and objects (metres; X right, Y up, Z forward)


class _Cam:
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


def _jitter(rng: np.random.Generator, color: Sequence[float], amount: float = 14.0) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.normal(0, amount, 3), 0, 255)


def _pick(rng: np.random.Generator, palette: Sequence[Sequence[float]], amount: float = 14.0) -> np.ndarray:
    return _jitter(rng, palette[rng.integers(len(palette))], amount)


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


class _Street:
    """One frame's layout plus the routines that paint it."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.cam = _Cam(rng, height, width)
        self.cv = _Canvas(height, width)
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
        """Queue `paint(*args, **kwargs)` at depth key z; compose() paints the queue far to near."""
        self.items.append((z, functools.partial(paint, *args, **kwargs)))

    # ---- static scenery ----------------------------------------------------------------------------------------

    def sky(self) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        top = _pick(rng, [(70, 120, 185), (110, 150, 200), (170, 180, 192), (140, 165, 200)], 10)
        bottom = np.clip(top + rng.uniform(30, 60), 0, 255)
        bands, y_end = 10, cam.yh + 2
        for i in range(bands):
            c = top + (bottom - top) * i / (bands - 1)
            y0, y1 = y_end * i / bands, y_end * (i + 1) / bands
            cv.poly([(0, y0), (cam.width, y0), (cam.width, y1 + 1), (0, y1 + 1)], SKY, c, T_SKY)
        for _ in range(rng.integers(0, 4)):  # clouds
            cx, cy = rng.uniform(0, cam.width), rng.uniform(0, cam.yh * 0.6)
            rx = cam.width * rng.uniform(0.05, 0.15)
            for _ in range(3):
                cv.ellipse(cx + rng.normal(0, rx * 0.5), cy + rng.normal(0, rx * 0.1), rx, rx * 0.3, SKY,
                           _jitter(rng, (225, 228, 232), 8), T_SKY)  # fmt: skip

    def backdrop(self) -> None:
        """The end of the street: a row of far buildings and trees across the view."""
        rng, cam, cv = self.rng, self.cam, self.cv
        x, z = -80.0, self.z_far
        while x < 80:
            w = rng.uniform(6, 20)
            if rng.random() < 0.3:
                c = _pick(rng, [(60, 90, 40), (80, 105, 50)])
                for _ in range(4):
                    cx, cy = x + rng.uniform(0, w), rng.uniform(3, 10)
                    r = rng.uniform(3, 7) * cam.s(z)
                    cv.ellipse(*cam.p(cx, cy, z), r, r * 0.8, VEGETATION, c, T_VEG)
                cv.poly(cam.front(x, x + w, z, 0, rng.uniform(3, 6)), VEGETATION, c, T_VEG)
            else:
                h = rng.uniform(8, 32)
                cv.poly(cam.front(x, x + w, z, 0, h), BUILDING, _pick(rng, BUILDING_COLORS), T_BUILDING)
                self.windows_front(x, x + w, z, h)
            x += w

    def windows_front(self, x0: float, x1: float, z: float, h: float) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        if cam.s(z) * 1.0 < 2:  # windows under ~2 px: skip the draw calls
            return
        col = _pick(rng, WINDOW_COLORS, 10)
        floor_h, pitch = rng.uniform(2.8, 3.4), rng.uniform(2.0, 3.2)
        for y in np.arange(2.5, h - 1.5, floor_h):
            for x in np.arange(x0 + pitch * 0.3, x1 - pitch * 0.6, pitch):
                cv.poly(cam.front(x, x + pitch * 0.55, z, y, y + floor_h * 0.55), BUILDING,
                        _jitter(rng, col, 12), T_PLAIN)  # fmt: skip

    def ground(self) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        zf = self.z_far
        # whatever is not covered below the horizon (side streets, far away) is plain ground
        cv.poly([(0, cam.yh), (cam.width, cam.yh), (cam.width, cam.height), (0, cam.height)], GROUND,
                _jitter(rng, (110, 100, 90)), T_ROAD)  # fmt: skip
        asphalt = _pick(rng, [(80, 80, 84), (92, 90, 92), (68, 70, 74), (100, 98, 100)], 6)
        cv.poly(cam.ground(self.road_l, self.road_r, 0.3, zf), ROAD, asphalt, T_ROAD)
        if self.parking_w:
            c = np.clip(asphalt + rng.uniform(8, 25) * np.array([1, 0.9, 1.2]), 0, 255)
            cv.poly(cam.ground(self.road_r, self.road_r + self.parking_w, 0.3, zf), PARKING, c, T_ROAD)
            for z in np.arange(rng.uniform(2, 6), zf, 5.5):
                cv.poly(cam.ground(self.road_r, self.road_r + self.parking_w, z, z + 0.15), PARKING, (220,) * 3)
        # rails: the leftmost lane carries a tram track (void), two steel rails on gravel-coloured bed
        tx = self.tram_x
        cv.poly(cam.ground(tx - 1.2, tx + 1.2, 0.3, zf), RAIL, _jitter(rng, (112, 102, 92), 8), T_TERRAIN)
        for rx in (tx - 0.75, tx + 0.75):
            cv.poly(cam.ground(rx - 0.06, rx + 0.06, 0.3, zf), RAIL, _jitter(rng, (160, 160, 165), 6), T_METAL)
        self.markings(asphalt)
        for s in (-1, 1):
            self.walk(s)

    def markings(self, asphalt: np.ndarray) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        white = _jitter(rng, (215, 215, 210), 8)
        half = 0.07
        # lane separators between own lanes and the centre line; dashes 3 m every 9 m
        lines = [self.lane_w / 2 + i * self.lane_w for i in range(self.n_right)]
        lines += [-self.lane_w / 2 - i * self.lane_w for i in range(self.n_left)]
        for x in lines:
            solid = x == -self.lane_w / 2 and rng.random() < 0.5
            if solid:
                cv.poly(cam.ground(x - half, x + half, 0.3, self.z_far), ROAD, white, T_PLAIN)
                continue
            for z in np.arange(rng.uniform(0, 9), self.z_far, 9.0):
                cv.poly(cam.ground(x - half, x + half, z, z + 3.0), ROAD, white, T_PLAIN)
        for x in (self.road_l + 0.3, self.road_r - 0.3):  # edge lines
            cv.poly(cam.ground(x - half, x + half, 0.3, self.z_far), ROAD, white, T_PLAIN)
        if rng.random() < 0.5:  # zebra crossing
            z0 = rng.uniform(12, 35)
            for x in np.arange(self.road_l + 0.5, self.road_r - 0.5, 1.0):
                cv.poly(cam.ground(x, x + 0.5, z0, z0 + 3.5), ROAD, white, T_PLAIN)
        for _ in range(rng.integers(0, 3)):  # patches and manholes: asphalt is not one colour
            x, z = rng.uniform(self.road_l, self.road_r), rng.uniform(5, 40)
            c = np.clip(asphalt * rng.uniform(0.85, 1.15), 0, 255)
            cv.poly(cam.ground(x, x + rng.uniform(0.6, 3), z, z + rng.uniform(0.6, 4)), ROAD, c, T_ROAD)

    def walk(self, s: int) -> None:
        """Sidewalk with paving joints, curb, then the setback strip (terrain, ground or parking)."""
        rng, cam, cv = self.rng, self.cam, self.cv
        a, b = sorted((self.curb(s), self.walk_out(s)))
        pave = _pick(rng, [(168, 166, 162), (178, 150, 146), (150, 150, 152), (186, 180, 168)], 8)
        cv.poly(cam.ground(a, b, 0.3, self.z_far), SIDEWALK, pave, T_SIDEWALK)
        joint = np.clip(pave * 0.8, 0, 255)
        step = rng.uniform(0.8, 1.6)
        for z in np.arange(rng.uniform(0.3, 1.5), min(self.z_far, 40), step):
            cv.poly(cam.ground(a, b, z, z + 0.05), SIDEWALK, joint, T_SIDEWALK)
        c = self.curb(s)
        cv.poly(cam.ground(c - 0.15, c + 0.15, 0.3, self.z_far), SIDEWALK, np.clip(pave * 1.1, 0, 255), T_SIDEWALK)
        # setback: grass strips (terrain) in segments, the rest plain ground
        o, f = sorted((self.walk_out(s), self.facade_x(s)))
        z = 0.3
        while z < self.z_far:
            length = rng.uniform(8, 30)
            kind = rng.random()
            if kind < 0.65:
                grass = _pick(rng, [(132, 160, 80), (150, 168, 96), (160, 150, 100), (118, 150, 72)], 10)
                cv.poly(cam.ground(o, f, z, z + length), TERRAIN, grass, T_TERRAIN)
            elif kind < 0.85:
                cv.poly(cam.ground(o, f, z, z + length), SIDEWALK, pave, T_SIDEWALK)
            z += length

    def facades(self, s: int) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        x = self.facade_x(s)
        segments = []
        z = 0.5
        while z < self.z_far:
            length = rng.uniform(8, 30)
            segments.append((z, min(z + length, self.z_far), rng.random()))
            z += length + (rng.uniform(6, 15) if rng.random() < 0.2 else 0.0)
        for z0, z1, kind in reversed(segments):  # far to near
            if kind < 0.22:
                self.tree_row(x + s * 1.5, z0, z1)
                continue
            h = rng.uniform(8, 28)
            color = _pick(rng, BUILDING_COLORS)
            cv.poly(cam.side(x, z0, z1, 0, h), BUILDING, color, T_BUILDING)
            # the end wall facing us, seen past the gap before this block
            cv.poly(cam.front(x, x + s * 12, z0, 0, h), BUILDING, np.clip(color * 0.85, 0, 255), T_BUILDING)
            self.windows_side(x, z0, z1, h)
            cv.poly(cam.side(x, z0, z1, h - 0.5, h), BUILDING, np.clip(color * 0.7, 0, 255), T_PLAIN)

    def windows_side(self, x: float, z0: float, z1: float, h: float) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        col = _pick(rng, WINDOW_COLORS, 10)
        floor_h, pitch = rng.uniform(2.8, 3.4), rng.uniform(2.0, 3.4)
        shop = rng.random() < 0.5
        for z in np.arange(z0 + pitch * 0.3, z1 - pitch * 0.6, pitch):
            if cam.s(z) * pitch < 4:  # too far: windows would be sub-pixel
                break
            if shop:
                cv.poly(cam.side(x, z, z + pitch * 0.8, 0.4, 2.6), BUILDING, _jitter(rng, col, 15), T_PLAIN)
            for y in np.arange(3.2, h - 1.5, floor_h):
                cv.poly(cam.side(x, z, z + pitch * 0.5, y, y + floor_h * 0.5), BUILDING, _jitter(rng, col, 12), T_PLAIN)

    def tree_row(self, x: float, z0: float, z1: float) -> None:
        for z in np.arange(z1, z0, -self.rng.uniform(4, 8)):
            self.tree(x, z, big=True)

    def tree(self, x: float, z: float, big: bool = False) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        h = rng.uniform(5, 11) if big else rng.uniform(4, 8)
        green = _pick(rng, [(52, 82, 34), (70, 100, 42), (44, 70, 40), (86, 110, 50)], 10)
        trunk_w = rng.uniform(0.3, 0.5)
        cv.poly(cam.front(x - trunk_w / 2, x + trunk_w / 2, z, 0, h * 0.6), VEGETATION,
                _jitter(rng, (90, 75, 60), 10), T_CLOTH)  # fmt: skip
        r = h * rng.uniform(0.25, 0.4)
        for _ in range(rng.integers(3, 6)):
            cx, cy = cam.p(x + rng.normal(0, r * 0.4), h * 0.7 + rng.normal(0, r * 0.3), z)
            rr = r * rng.uniform(0.6, 1.0) * cam.s(z)
            cv.ellipse(cx, cy, rr, rr * rng.uniform(0.8, 1.1), VEGETATION, _jitter(rng, green, 8), T_VEG)

    def hedge(self, s: int, z0: float, z1: float) -> None:
        x = self.walk_out(s) + s * 0.6
        h = self.rng.uniform(0.8, 1.6)
        green = _pick(self.rng, [(52, 82, 34), (70, 100, 42), (44, 70, 40)], 10)
        self.cv.poly(self.cam.side(x, z0, z1, 0, h), VEGETATION, green, T_VEG)
        self.cv.poly(self.cam.front(x, x + s * 0.9, z0, 0, h), VEGETATION, green * 0.9, T_VEG)

    def barrier(self, s: int, z0: float, z1: float, label: int) -> None:
        """A wall or fence along the outer edge of the sidewalk: long side face plus its near end."""
        rng, cam, cv = self.rng, self.cam, self.cv
        x = self.walk_out(s) + s * 0.2
        if label == WALL:
            h = rng.uniform(1.2, 2.5)
            c = _pick(rng, [(128, 128, 142), (150, 146, 150), (118, 114, 128), (160, 150, 140)], 8)
            cv.poly(cam.side(x, z0, z1, 0, h), WALL, c, T_WALL)
            cv.poly(cam.front(x, x + s * 0.35, z0, 0, h), WALL, c * 0.85, T_WALL)
            cv.poly(cam.side(x, z0, z1, h - 0.12, h), WALL, np.clip(c * 1.15, 0, 255), T_PLAIN)  # coping
        else:
            h = rng.uniform(1.3, 2.4)
            c = _pick(rng, [(110, 120, 108), (130, 100, 70), (150, 150, 150), (80, 100, 90)], 10)
            cv.poly(cam.side(x, z0, z1, 0, h), FENCE, c, T_FENCE)
            for z in np.arange(z0, z1, rng.uniform(2.0, 3.0)):  # posts
                cv.poly(cam.side(x, z, z + 0.12, 0, h + 0.05), FENCE, c * 0.7, T_METAL)
            cv.poly(cam.side(x, z0, z1, h - 0.08, h), FENCE, c * 0.75, T_METAL)

    def guard_rail(self, z0: float, z1: float) -> None:
        x = self.road_l - 0.3
        c = _jitter(self.rng, (170, 170, 175), 8)
        self.cv.poly(self.cam.side(x, z0, z1, 0.45, 0.8), GUARD_RAIL, c, T_WALL)
        for z in np.arange(z0, z1, 2.0):
            self.cv.poly(self.cam.side(x, z, z + 0.12, 0, 0.75), GUARD_RAIL, c * 0.7, T_METAL)

    # ---- poles, signs, lights ----------------------------------------------------------------------------------

    def pole(self, x: float, z: float, kind: str) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        w = rng.uniform(0.4, 0.55)  # fat: real poles are ~0.15 m but vanish at 1/16 scale
        c = _pick(rng, [(140, 140, 142), (118, 120, 118), (70, 84, 74), (160, 160, 155)], 8)
        h = {"sign": rng.uniform(2.8, 3.8), "light": rng.uniform(3.6, 5.0), "lamp": rng.uniform(6, 9)}[kind]
        cv.poly(cam.front(x - w / 2, x + w / 2, z, 0, h), POLE, c, T_METAL)
        cv.poly(cam.front(x - w / 6, x + w / 10, z, 0, h), POLE, np.clip(c * 1.2, 0, 255), T_METAL)  # highlight
        if kind == "sign":
            self.sign(x, h - 0.3, z)
            if rng.random() < 0.4:
                self.sign(x, h - 1.2, z)
        elif kind == "light":
            self.light(x, h, z, w)
        else:
            arm = -np.sign(x) * rng.uniform(1.5, 3.0)
            cv.poly([cam.p(x, h - 0.15, z), cam.p(x + arm, h, z), cam.p(x + arm, h + 0.15, z), cam.p(x, h, z)],
                    POLE, c, T_METAL)  # fmt: skip
            cv.poly(cam.front(x + arm - 0.5, x + arm + 0.5, z, h - 0.25, h + 0.05), POLE, (200, 200, 190), T_METAL)

    def sign(self, x: float, y: float, z: float) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        r = rng.uniform(0.5, 0.7)
        cx, cy = cam.p(x, y, z)
        rp = r * cam.s(z)
        shape = rng.integers(4)
        red, white, blue, yellow = (205, 30, 34), (232, 232, 230), (30, 80, 176), (236, 196, 20)
        if shape == 0:  # prohibition: red ring, white disc
            cv.ellipse(cx, cy, rp, rp, SIGN, _jitter(rng, red, 8), T_PLAIN)
            cv.ellipse(cx, cy, rp * 0.75, rp * 0.75, SIGN, _jitter(rng, white, 6), T_PLAIN)
        elif shape == 1:  # mandatory: blue disc, white arrow
            cv.ellipse(cx, cy, rp, rp, SIGN, _jitter(rng, blue, 8), T_PLAIN)
            cv.poly([(cx - rp * 0.15, cy + rp * 0.6), (cx + rp * 0.15, cy + rp * 0.6), (cx + rp * 0.15, cy - rp * 0.1),
                     (cx + rp * 0.4, cy - rp * 0.1), (cx, cy - rp * 0.6), (cx - rp * 0.4, cy - rp * 0.1),
                     (cx - rp * 0.15, cy - rp * 0.1)], SIGN, _jitter(rng, white, 6))  # fmt: skip
        elif shape == 2:  # warning: red triangle
            up = rng.random() < 0.7
            k = -1 if up else 1
            tri = [(cx, cy + k * rp), (cx - rp, cy - k * rp * 0.75), (cx + rp, cy - k * rp * 0.75)]
            cv.poly(tri, SIGN, _jitter(rng, red, 8))
            cv.poly([(cx + (px - cx) * 0.6, cy + (py - cy) * 0.6) for px, py in tri], SIGN, _jitter(rng, white, 6))
        else:  # information: blue or yellow rectangle with a white field
            c = blue if rng.random() < 0.6 else yellow
            wr = rp * rng.uniform(1.0, 1.6)
            cv.poly([(cx - wr, cy - rp), (cx + wr, cy - rp), (cx + wr, cy + rp), (cx - wr, cy + rp)], SIGN,
                    _jitter(rng, c, 8))  # fmt: skip
            cv.poly([(cx - wr * 0.7, cy - rp * 0.3), (cx + wr * 0.7, cy - rp * 0.3), (cx + wr * 0.7, cy + rp * 0.3),
                     (cx - wr * 0.7, cy + rp * 0.3)], SIGN, _jitter(rng, white, 6))  # fmt: skip

    def light(self, x: float, y: float, z: float, pole_w: float) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        w, h = rng.uniform(0.6, 0.75), rng.uniform(1.3, 1.6)
        housing = _pick(rng, [(30, 32, 30), (44, 46, 40), (24, 26, 28), (70, 66, 40)], 6)
        cv.poly(cam.front(x - w / 2, x + w / 2, z, y - h, y), LIGHT, housing, T_PLAIN)
        lit = rng.integers(3)
        lamps = [(225, 40, 30), (240, 180, 30), (40, 215, 100)]
        for i in range(3):
            cx, cy = cam.p(x, y - h * (0.2 + 0.3 * i), z)
            c = lamps[i] if i == lit else np.asarray(lamps[i]) * 0.3 + 20
            r = w * 0.3 * cam.s(z)
            cv.ellipse(cx, cy, r, r, LIGHT, _jitter(rng, c, 8), T_PLAIN)

    # ---- people and two-wheelers (billboards in the plane Z = z) -------------------------------------------------

    def person(self, x: float, z: float) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        o = cv.new_object(PERSON)
        h = rng.uniform(1.55, 1.95)
        w = h * rng.uniform(0.3, 0.36)  # shoulders incl. arms and bags
        legs, shirt = _pick(rng, CLOTH_COLORS[:6] + [(40, 50, 80)], 12), _pick(rng, CLOTH_COLORS, 16)
        stride = rng.uniform(0, 0.18) * h
        pts = [cam.p(x - w * 0.32 - stride / 2, 0, z), cam.p(x - w * 0.05, 0, z), cam.p(x, h * 0.47, z),
               cam.p(x + w * 0.05, 0, z), cam.p(x + w * 0.32 + stride / 2, 0, z), cam.p(x + w * 0.3, h * 0.5, z),
               cam.p(x - w * 0.3, h * 0.5, z)]  # fmt: skip
        cv.poly(pts, PERSON, legs, T_CLOTH, o)
        torso = [
            cam.p(x - w * 0.35, h * 0.45, z),
            cam.p(x + w * 0.35, h * 0.45, z),
            cam.p(x + w * 0.5, h * 0.8, z),
            cam.p(x + w * 0.25, h * 0.85, z),
            cam.p(x - w * 0.25, h * 0.85, z),
            cam.p(x - w * 0.5, h * 0.8, z),
        ]
        cv.poly(torso, PERSON, shirt, T_CLOTH, o)
        cx, cy = cam.p(x, h * 0.92, z)
        r = h * 0.075 * cam.s(z)
        cv.ellipse(cx, cy, r, r * 1.15, PERSON, _pick(rng, SKIN_COLORS, 10), T_PLAIN, o)
        cv.ellipse(cx, cy - r * 0.4, r * 1.02, r * 0.8, PERSON, _pick(rng, [(30, 25, 20), (90, 60, 30)]), T_PLAIN, o)
        if rng.random() < 0.3:  # a bag
            cv.poly(
                cam.front(x + w * 0.35, x + w * 0.6, z, h * 0.35, h * 0.6), PERSON, _pick(rng, CLOTH_COLORS), T_CLOTH, o
            )

    def two_wheeler(self, x: float, z: float, motor: bool, rider: bool) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        label = MOTORCYCLE if motor else BICYCLE
        o = cv.new_object(label)
        d = 1 if rng.random() < 0.5 else -1  # facing right or left
        s = cam.s(z)
        wheel_r = (0.32 if motor else 0.34) * rng.uniform(0.95, 1.05)
        base = (1.45 if motor else 1.05) * rng.uniform(0.95, 1.05)
        xb, xf = x - d * base / 2, x + d * base / 2  # back and front wheel centres
        tyre = _jitter(rng, (24, 24, 26), 4)
        frame = _pick(rng, BIKE_COLORS, 10)
        for xc in (xb, xf):
            cx, cy = cam.p(xc, wheel_r, z)
            cv.ellipse(cx, cy, wheel_r * s, wheel_r * s, label, tyre, T_PLAIN, o)
            inner = (0.55 if motor else 0.82) * wheel_r * s
            cv.ellipse(cx, cy, inner, inner, label, _jitter(rng, (120, 120, 125) if motor else (95, 95, 98), 8),
                       T_SPOKES if not motor else T_METAL, o)  # fmt: skip
        if motor:
            body = _jitter(rng, (36, 36, 40), 8)
            cv.poly([cam.p(xb, 0.45, z), cam.p(xf - d * 0.15, 0.35, z), cam.p(xf, 0.75, z),
                     cam.p(x + d * 0.35, 1.0, z), cam.p(xb - d * 0.1, 0.85, z)], label, body, T_METAL, o)  # fmt: skip
            cv.poly([cam.p(x - d * 0.05, 0.8, z), cam.p(x + d * 0.45, 0.8, z), cam.p(x + d * 0.4, 1.05, z),
                     cam.p(x, 1.0, z)], label, _pick(rng, BIKE_COLORS[1:], 12), T_METAL, o)  # tank  # fmt: skip
            cv.line([cam.p(xf, wheel_r, z), cam.p(xf - d * 0.2, 1.15, z)], 0.08 * s, label, body, T_METAL, o)
        else:
            tube = 0.07 * s
            seat, bar, crank = (x - d * 0.12, 0.95), (xf - d * 0.12, 1.05), (x, 0.3)
            for a, b in [((xb, wheel_r), crank), ((xb, wheel_r), seat), (seat, crank), (crank, bar), (seat, bar),
                         ((xf, wheel_r), bar)]:  # fmt: skip
                cv.line([cam.p(a[0], a[1], z), cam.p(b[0], b[1], z)], tube, label, frame, T_METAL, o)
            cv.line(
                [cam.p(bar[0] - d * 0.1, 1.08, z), cam.p(bar[0] + d * 0.1, 1.1, z)],
                tube,
                label,
                (30, 30, 30),
                T_METAL,
                o,
            )
        if rider:
            self.rider_on(x, z, d, motor)

    def rider_on(self, x: float, z: float, d: int, motor: bool) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        o = cv.new_object(RIDER)
        seat_y = 0.95 if motor else 1.0
        hip = (x - d * (0.15 if motor else 0.12), seat_y)
        shoulder = (x + d * (0.1 if motor else 0.2), seat_y + 0.6)
        legs, jacket = _pick(rng, CLOTH_COLORS[:6], 12), _pick(rng, CLOTH_COLORS, 16)
        leg_w = 0.16 * cam.s(z)
        foot = (x + d * 0.05, 0.3)
        knee = (x + d * 0.3, 0.7)
        cv.line([cam.p(*hip, z), cam.p(*knee, z), cam.p(*foot, z)], leg_w, RIDER, legs, T_CLOTH, o)
        tw = 0.2
        torso = [(hip[0] - tw, hip[1]), (hip[0] + tw, hip[1]), (shoulder[0] + tw, shoulder[1]),
                 (shoulder[0] - tw, shoulder[1])]  # fmt: skip
        cv.poly([cam.p(px, py, z) for px, py in torso], RIDER, jacket, T_CLOTH, o)
        cv.line([cam.p(*shoulder, z), cam.p(x + d * 0.5, seat_y + 0.15, z)], 0.12 * cam.s(z), RIDER, jacket,
                T_CLOTH, o)  # fmt: skip
        hx, hy = cam.p(shoulder[0] + d * 0.05, shoulder[1] + 0.2, z)
        r = 0.13 * cam.s(z)
        cv.ellipse(hx, hy, r, r * 1.1, RIDER, _pick(rng, SKIN_COLORS, 10), T_PLAIN, o)
        cv.ellipse(hx, hy - r * 0.35, r * 1.15, r * 0.85, RIDER, _pick(rng, HELMET_COLORS, 10), T_PLAIN, o)

    # ---- vehicles (boxes: the face towards us plus the side face the camera can see) -----------------------------

    def vehicle(self, kind: str, x: float, z: float, oncoming: bool = False) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        dims = {"car": (1.8, 1.5, 4.4), "truck": (2.5, 3.4, 8.5), "bus": (2.55, 3.2, 12.0), "tram": (2.4, 3.5, 28.0)}
        w, h, length = (v * rng.uniform(0.93, 1.07) for v in dims[kind])
        label = {"car": CAR, "truck": TRUCK, "bus": BUS, "tram": TRAIN}[kind]
        palette = {"car": CAR_COLORS, "truck": TRUCK_COLORS, "bus": BUS_COLORS, "tram": TRAM_COLORS}[kind]
        o = cv.new_object(label)
        body = _pick(rng, palette, 10)
        glass = _pick(rng, WINDOW_COLORS[:3], 8)
        dark = _jitter(rng, (24, 24, 26), 4)
        x0, x1, z1 = x - w / 2, x + w / 2, z + length
        # the side face we see: the left one when the vehicle is right of the camera and vice versa
        sx = x0 if x > 0 else x1
        if abs(x) > w / 2:
            side = cam.side(sx, z, z1, 0.25, h)
            if kind == "car":
                side = [cam.p(sx, 0.25, z), cam.p(sx, h * 0.6, z), cam.p(sx, h, z + length * 0.3),
                        cam.p(sx, h, z + length * 0.75), cam.p(sx, h * 0.6, z1), cam.p(sx, 0.25, z1)]  # fmt: skip
            cv.poly(side, label, body, T_CARGO if kind == "truck" else T_METAL, o)
            if kind == "car":
                cv.poly(cam.side(sx, z + length * 0.3, z + length * 0.72, h * 0.65, h * 0.93), label, glass, T_PLAIN, o)
            elif kind == "truck":
                cv.poly(cam.side(sx, z1 - 2.2, z1, 1.2, h * 0.75), label, _pick(rng, CAR_COLORS), T_METAL, o)
                cv.poly(cam.side(sx, z1 - 1.4, z1 - 0.3, 1.9, h * 0.7), label, glass, T_PLAIN, o)
                cv.poly(cam.side(sx, z, z1 - 2.4, h * 0.45, h * 0.55), label, body * 0.8, T_PLAIN, o)
            else:  # bus, tram: a long band of windows, a coloured stripe under it
                cv.poly(cam.side(sx, z + 0.5, z1 - 0.5, h * 0.45, h * 0.85), label, glass, T_PLAIN, o)
                for zz in np.arange(z + 1.6, z1 - 0.5, 1.6 if kind == "bus" else 2.2):
                    cv.poly(cam.side(sx, zz, zz + 0.15, h * 0.45, h * 0.85), label, body, T_METAL, o)
                stripe = _pick(rng, [(200, 30, 30), (30, 30, 30), (40, 120, 60), (30, 60, 160)])
                cv.poly(cam.side(sx, z + 0.2, z1 - 0.2, h * 0.3, h * 0.38), label, stripe, T_PLAIN, o)
            for zz in [z + 0.8, z1 - 0.9] if kind == "car" else [z + 1.5, z1 - 2.0]:
                cx, cy = cam.p(sx, 0.34, zz + 0.35)
                r = 0.34 * cam.s(zz + 0.35)
                cv.ellipse(cx, cy, r * abs(sx) / (zz + 0.35) * 0.8 + 1, r, label, dark, T_PLAIN, o)
        if kind == "tram":  # pantograph: thin arms above the roof, still part of the train
            cv.line([cam.p(x, h, z + 8), cam.p(x, h + 0.9, z + 9), cam.p(x, h + 0.9, z + 10)], 0.06 * cam.s(z + 8),
                    label, (60, 60, 60), T_METAL, o)  # fmt: skip
        # the end facing us (rear, or front when oncoming)
        if kind == "car":
            cv.poly([cam.p(x0, 0.25, z), cam.p(x1, 0.25, z), cam.p(x1, h * 0.55, z), cam.p(x + w * 0.38, h, z),
                     cam.p(x - w * 0.38, h, z), cam.p(x0, h * 0.55, z)], label, body, T_METAL, o)  # fmt: skip
            glass_pts = [(x0 + w * 0.17, h * 0.6), (x1 - w * 0.17, h * 0.6), (x + w * 0.33, h * 0.93),
                         (x - w * 0.33, h * 0.93)]  # fmt: skip
            cv.poly([cam.p(px, py, z) for px, py in glass_pts], label, glass, T_PLAIN, o)
            lamp = (235, 230, 200) if oncoming else (200, 30, 30)
            for a in (x0 + 0.05, x1 - 0.35):
                cv.poly(cam.front(a, a + 0.3, z, h * 0.4, h * 0.52), label, _jitter(rng, lamp, 10), T_PLAIN, o)
            cv.poly(cam.front(x - 0.26, x + 0.26, z, h * 0.2, h * 0.3), label, (225, 225, 225), T_PLAIN, o)  # plate
            for a in (x0, x1 - 0.3):  # tyres under the bumper
                cv.poly(cam.front(a, a + 0.3, z + 0.2, 0, 0.3), label, dark, T_PLAIN, o)
        else:
            cv.poly(cam.front(x0, x1, z, 0.25, h), label, body, T_CARGO if kind == "truck" else T_METAL, o)
            if kind == "truck" and not oncoming:  # cargo doors
                cv.poly(cam.front(x - 0.04, x + 0.04, z, 0.4, h - 0.1), label, body * 0.6, T_PLAIN, o)
                cv.poly(cam.front(x0, x1, z, 0.25, 0.6), label, dark, T_PLAIN, o)
            else:
                top = h * (0.5 if kind == "truck" else 0.45)
                cv.poly(cam.front(x0 + 0.15, x1 - 0.15, z, top, h - 0.25), label, glass, T_PLAIN, o)
                if kind in ("bus", "tram"):
                    cv.poly(cam.front(x0 + 0.5, x1 - 0.5, z, h - 0.22, h - 0.05), label, (30, 30, 20), T_PLAIN, o)
            for a in (x0, x1 - 0.35):
                cv.poly(cam.front(a, a + 0.35, z + 0.2, 0, 0.35), label, dark, T_PLAIN, o)

    def static_thing(self, x: float, z: float) -> None:
        """Bins, bollards, advertising columns: void 'static' clutter on the sidewalk."""
        rng, cam, cv = self.rng, self.cam, self.cv
        kind = rng.integers(3)
        if kind == 0:
            w, h = rng.uniform(0.5, 0.8), rng.uniform(0.9, 1.2)
            c = _pick(rng, [(40, 90, 50), (90, 90, 90), (220, 120, 30), (40, 60, 120)])
        elif kind == 1:
            w, h = 0.2, rng.uniform(0.8, 1.0)
            c = _pick(rng, [(40, 40, 40), (120, 120, 120)])
        else:
            w, h = rng.uniform(1.0, 1.3), rng.uniform(2.5, 3.2)
            c = _pick(rng, [(200, 160, 60), (60, 120, 160), (160, 60, 60), (210, 210, 200)])
        cv.poly(cam.front(x - w / 2, x + w / 2, z, 0, h), STATIC, c, T_CLOTH)

    def ego(self) -> None:
        """The car we sit in: a hood at the bottom of every Cityscapes frame (void)."""
        rng, cam, cv = self.rng, self.cam, self.cv
        top = cam.height * rng.uniform(0.88, 0.93)
        edge = top + cam.height * rng.uniform(0.02, 0.05)
        W = cam.width
        pts = [(0, cam.height), (0, edge), (W * 0.2, top + (edge - top) * 0.3), (W * 0.5, top),
               (W * 0.8, top + (edge - top) * 0.3), (W, edge), (W, cam.height)]  # fmt: skip
        c = _pick(rng, [(30, 30, 34), (60, 62, 66), (150, 152, 156)], 6)
        cv.poly(pts, EGO, c, T_METAL)
        cv.poly([(W * 0.35, top + 3), (W * 0.65, top + 3), (W * 0.6, cam.height), (W * 0.4, cam.height)], EGO,
                np.clip(c * 1.3 + 10, 0, 255), T_METAL)  # fmt: skip

    # ---- composing the frame -----------------------------------------------------------------------------------

    def compose(self) -> None:
        rng = self.rng
        self.sky()
        self.backdrop()
        self.ground()
        for s in (-1, 1):
            self.facades(s)
        u = rng.uniform
        sides = (-1, 1)
        x_max = self.cam.width / 2 * 0.92 / self.cam.f  # |X| / Z inside the frame, with a margin

        def zin(x: float, lo: float, hi: float) -> float:
            """A depth in [lo, hi] at which lateral position x is in view (near sidewalks are off-frame)."""
            lo = max(lo, abs(x) / x_max)
            return u(lo, max(hi, lo + 3))

        def walk_x(s: int, margin: float = 0.5) -> float:
            a, b = sorted((self.curb(s), self.walk_out(s)))
            return u(a + margin, max(a + margin, b - margin))

        # walls, fences and hedges along the sidewalk's outer edge; one wall and one fence are always near. They
        # lie along Z behind everything on the sidewalk, so they paint first (depth key + 1000), trees before them
        s_wall = int(rng.choice(sides))
        for s, label in ((s_wall, WALL), (-s_wall, FENCE)):
            z = zin(self.walk_out(s), 4, 16)
            self.add(1000 + z, self.barrier, s, z, z + u(8, 20), label)
        for _ in range(rng.integers(0, 3)):
            s = int(rng.choice(sides))
            z = zin(self.walk_out(s), 8, 50)
            kind = rng.random()
            if kind < 0.35:
                self.add(1000 + z, self.barrier, s, z, z + u(5, 20), WALL)
            elif kind < 0.7:
                self.add(1000 + z, self.barrier, s, z, z + u(5, 20), FENCE)
            else:
                self.add(1000 + z, self.hedge, s, z, z + u(5, 20))
        if rng.random() < 0.3:
            z = zin(self.road_l, 6, 30)
            self.add(z, self.guard_rail, z, z + u(10, 40))
        for _ in range(rng.integers(1, 5)):  # trees at the outer edge of the sidewalk
            s = int(rng.choice(sides))
            x = self.walk_out(s) + s * 0.8
            z = zin(x, 6, 60)
            self.add(2000 + z, self.tree, x, z)
        # poles near the curb: at least one sign and one traffic light within ~20 m
        kinds = ["sign", "light"] + [str(rng.choice(["sign", "light", "lamp"])) for _ in range(rng.integers(1, 5))]
        for i, kind in enumerate(kinds):
            s = int(rng.choice(sides))
            x = self.curb(s) + s * u(0.5, 1.0)
            z = zin(x, 6, 20) if i < 2 else zin(x, 6, 45)
            self.add(z, self.pole, x, z, kind)
        # people on the sidewalks (at least one within ~18 m), parked bicycles and motorcycles, clutter
        for i in range(int(rng.integers(2, 6))):
            x = walk_x(int(rng.choice(sides)))
            z = zin(x, 5, 18) if i == 0 else zin(x, 5, 35)
            self.add(z, self.person, x, z)
        x = walk_x(int(rng.choice(sides)), 1.0)
        z = zin(x + 1, 5, 16)
        self.add(z, self.two_wheeler, x, z, motor=False, rider=False)
        s = int(rng.choice(sides))
        x = self.curb(s) + s * 1.2 if s < 0 or not self.parking_w else self.road_r + self.parking_w / 2
        z = zin(x + 1.2, 6, 18)
        self.add(z, self.two_wheeler, x, z, motor=True, rider=False)
        for _ in range(rng.integers(0, 4)):
            x = walk_x(int(rng.choice(sides)))
            z = zin(x, 5, 30)
            self.add(z, self.static_thing, x, z)
        # a rider near the right edge of the road (bike lane), nearer than the traffic so it is rarely hidden
        x = self.road_r - u(0.6, 1.2)
        z = zin(x + 1.2, 6, 10)
        self.add(z, self.two_wheeler, x, z, motor=rng.random() < 0.5, rider=True)
        # traffic: tram on the rails, a bus and a truck in two other lanes, cars, parked cars beyond 18 m (nearer
        # they would hide the parked two-wheelers and the rider)
        lanes = [i * self.lane_w for i in range(-self.n_left + 1, self.n_right + 1)]  # non-tram lanes
        z_tram = u(12, 32)
        self.add(z_tram, self.vehicle, "tram", self.tram_x, z_tram, oncoming=rng.random() < 0.5)
        for kind, lane in zip(("bus", "truck"), rng.permutation(lanes)[:2]):
            lane = float(lane)
            z = u(14, 32) if lane == 0 else u(10, 30)  # near enough to stay large at 1/16 scale
            self.add(z, self.vehicle, kind, lane, z, oncoming=lane < 0)
        for i in range(int(rng.integers(1, 4))):
            # one near car in our lane or oncoming; right lanes only further on (the rider and the parked
            # two-wheelers on the right would vanish behind a near car there)
            near = [v for v in lanes if v <= 0]
            lane = float(near[int(rng.integers(len(near)))] if i == 0 else lanes[int(rng.integers(len(lanes)))])
            z = u(9, 13) if i == 0 else u(12, 60) if lane >= 0 else u(7, 60)
            self.add(z, self.vehicle, "car", lane + u(-0.3, 0.3), z, oncoming=lane < 0)
        if self.parking_w:
            for z in np.arange(u(18, 24), 70, u(8, 18)):
                if rng.random() < 0.4:
                    self.add(z, self.vehicle, "car", self.road_r + self.parking_w / 2 + 0.2, z)
        for _, paint in sorted(self.items, key=lambda t: -t[0]):  # painter's order: far first
            paint()
        self.ego()


def _present(cv: _Canvas) -> int:
    """How many of the 19 evaluated classes have at least one pixel (from the region map alone: cheap)."""
    counts = np.bincount(np.asarray(cv.img).ravel(), minlength=len(cv.labels))
    label_pixels = np.bincount(np.array(cv.labels), weights=counts, minlength=256)
    return int(np.count_nonzero(np.bincount(ID_TO_TRAIN, weights=label_pixels, minlength=256)[:NUM_CLASSES]))


def draw_scene(seed: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One street frame: (rgb uint8 HxWx3, labelIds uint8 HxW, instanceIds uint16 HxW), a pure function of seed.

    A layout that loses one of the 19 evaluated classes to occlusion is redrawn from the next sub-seed (up to 8
    times; painting is ~1/4 of the cost, rendering happens once), so every frame normally contains all of them.
    """
    height, width = hw
    best = None
    for attempt in range(8):
        rng = np.random.default_rng([seed, attempt])
        street = _Street(rng, height, width)
        street.compose()
        present = _present(street.cv)
        if best is None or present > best[0]:
            best = (present, street, rng)
        if present == NUM_CLASSES:
            break
    _, street, rng = best
    rgb, label_ids, instance_ids = _render(street.cv, rng)
    if rng.random() < 0.5:  # mirror: oncoming traffic and the tram on either side
        rgb, label_ids, instance_ids = rgb[:, ::-1], label_ids[:, ::-1], instance_ids[:, ::-1]
    return np.ascontiguousarray(rgb), np.ascontiguousarray(label_ids), np.ascontiguousarray(instance_ids)


# --------------------------------------------------------------------------------------------------------------------
# The dataset on disk


def _frame_seed(seed: int, split: str, index: int) -> int:
    """A scene seed from (seed, split, index): independent of worker count and of the other frames."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).generate_state(1)[0])


def _frames(split: str, num: int, cities: Sequence[str]) -> list[tuple[str, str, int]]:
    """(split, city, seq) for every frame: round-robin over the cities, seq counting per city."""
    return [(split, cities[i % len(cities)], i // len(cities)) for i in range(num)]


def _save_png(img: Image.Image, path: Path, compress_level: int) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    img.save(tmp, format="PNG", compress_level=compress_level)
    os.replace(tmp, path)  # a file either is whole or is not there


def _write_frame(job: tuple) -> None:
    out, split, city, seq, index, seed, hw = job
    rgb, label_ids, instance_ids = draw_scene(_frame_seed(seed, split, index), hw)
    stem = f"{city}_{seq:06d}_{FRAME_ID:06d}"
    img_dir, gt_dir = out / "leftImg8bit" / split / city, out / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    # compress_level 1: zlib at level 6 costs ~3x the drawing time on a noisy 2048x1024 frame for ~15% smaller files
    _save_png(Image.fromarray(rgb, "RGB"), img_dir / f"{stem}_leftImg8bit.png", 1)
    _save_png(Image.fromarray(label_ids, "L"), gt_dir / f"{stem}_gtFine_labelIds.png", 6)
    _save_png(Image.fromarray(instance_ids), gt_dir / f"{stem}_gtFine_instanceIds.png", 6)  # uint16 -> 'I;16'
    color = np.concatenate([ID_COLORS[label_ids], np.full(label_ids.shape + (1,), 255, np.uint8)], axis=2)
    _save_png(Image.fromarray(color, "RGBA"), gt_dir / f"{stem}_gtFine_color.png", 6)  # RGBA like json2labelImg


def make_dataset(
    out: str | Path,
    *,
    hw: tuple[int, int] = (1024, 2048),
    num_train: int = 30,
    num_val: int = 10,
    num_train_cities: int = 3,
    num_val_cities: int = 1,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write a synthetic Cityscapes-layout dataset under `out` and return its path.

    Deterministic for (seed, split, index) whatever the worker count. A folder already holding the same dataset
    (its synthetic.json matches) is left as is; one holding a different synthetic dataset is redrawn; any other
    non-empty folder is refused, so this never writes into a real Cityscapes download.
    """
    out = Path(out)
    height, width = hw
    if height < 16 or width < 16:
        raise ValueError(f"hw={hw}: frames must be at least 16x16")
    if not 1 <= num_train_cities <= len(TRAIN_CITIES):
        raise ValueError(f"num_train_cities={num_train_cities}: must be 1..{len(TRAIN_CITIES)}")
    if not 1 <= num_val_cities <= len(VAL_CITIES):
        raise ValueError(f"num_val_cities={num_val_cities}: must be 1..{len(VAL_CITIES)}")
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: need at least one frame")
    params = {
        "generator": GENERATOR,
        "hw": [height, width],
        "num_train": num_train,
        "num_val": num_val,
        "train_cities": list(TRAIN_CITIES[:num_train_cities]),
        "val_cities": list(VAL_CITIES[:num_val_cities]),
        "seed": seed,
    }
    marker = out / MARKER_NAME
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("params") == params and old.get("complete"):
            print(f"{out}: synthetic dataset already there with these parameters, nothing to do")
            return out
        # other parameters, or a run that was interrupted: redraw from scratch
        for sub in ("leftImg8bit", "gtFine"):
            shutil.rmtree(out / sub, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists, is not empty and is not a synthetic dataset (no {MARKER_NAME}); refusing")
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, params, complete=False)  # claims the folder first, so an interrupted run is redrawn

    jobs = [
        (out, split, city, seq, i, seed, (height, width))
        for split, n, cities in (("train", num_train, params["train_cities"]), ("val", num_val, params["val_cities"]))
        for i, (split, city, seq) in enumerate(_frames(split, n, cities))
    ]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(jobs), desc=f"synthetic {height}x{width}", unit="frame")
    if workers == 1:
        for job in jobs:
            _write_frame(job)
            bar.update()
    else:
        # fork, not spawn: an unguarded calling script is not re-run in every worker
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_frame, jobs):
                bar.update()
    bar.close()
    _write_marker(marker, params, complete=True)
    return out


def _write_marker(marker: Path, params: dict, *, complete: bool) -> None:
    tmp = marker.with_name(MARKER_NAME + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"complete": complete, "params": params}, indent=2) + "\n")
    os.replace(tmp, marker)


def parse_hw(text: str) -> tuple[int, int]:
    """'1024x2048' -> (1024, 2048); raises ValueError naming the text otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 16 or int(m[2]) < 16:
        raise ValueError(f"--hw: {text!r} is not HxW (e.g. 1024x2048, each side >= 16)")
    return int(m[1]), int(m[2])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m frrn_dist.synthetic",
        description="Write a synthetic Cityscapes dataset (leftImg8bit/, gtFine/ with labelIds, instanceIds and "
        "color PNGs, official names) of procedurally drawn street scenes containing all 19 evaluated classes. "
        "Deterministic for --seed; re-running with the same arguments does nothing.",
    )
    ap.add_argument("--out", required=True, help="output folder (created; must be empty or a synthetic dataset)")
    ap.add_argument("--hw", default="1024x2048", help="frame size HxW (default: 1024x2048, Cityscapes' own)")
    ap.add_argument("--train", type=int, default=30, help="number of train frames (default: 30)")
    ap.add_argument("--val", type=int, default=10, help="number of val frames (default: 10)")
    ap.add_argument("--train-cities", type=int, default=3, help=f"train cities, 1..{len(TRAIN_CITIES)} (default: 3)")
    ap.add_argument("--val-cities", type=int, default=1, help=f"val cities, 1..{len(VAL_CITIES)} (default: 1)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = ap.parse_args(argv)
    try:
        hw = parse_hw(args.hw)
        t0 = time.perf_counter()
        out = make_dataset(args.out, hw=hw, num_train=args.train, num_val=args.val,
                           num_train_cities=args.train_cities, num_val_cities=args.val_cities, seed=args.seed,
                           workers=args.workers)  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{out}: {args.train} train + {args.val} val frames at {hw[0]}x{hw[1]} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
