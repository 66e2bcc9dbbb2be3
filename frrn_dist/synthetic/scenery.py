"""Static scenery of a synthetic street, painted onto the Street's canvas: sky, the far end of the street, road
with markings and rails, sidewalks and setbacks, facades with windows, trees, hedges, walls, fences, guard rails
and the ego vehicle's hood.

Imports: numpy, frrn_dist.synthetic.geometry, frrn_dist.synthetic.palette.

Every painter takes the Street first and draws with its rng, so the order of calls fixes the frame.
"""

from __future__ import annotations

import numpy as np

from frrn_dist.synthetic.geometry import Street
from frrn_dist.synthetic.palette import (
    BUILDING,
    BUILDING_COLORS,
    EGO,
    FENCE,
    GROUND,
    GUARD_RAIL,
    PARKING,
    RAIL,
    ROAD,
    SIDEWALK,
    SKY,
    T_BUILDING,
    T_CLOTH,
    T_FENCE,
    T_METAL,
    T_PLAIN,
    T_ROAD,
    T_SIDEWALK,
    T_SKY,
    T_TERRAIN,
    T_VEG,
    T_WALL,
    TERRAIN,
    VEGETATION,
    WALL,
    WINDOW_COLORS,
    jitter,
    pick,
)


def sky(street: Street) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    top = pick(rng, [(70, 120, 185), (110, 150, 200), (170, 180, 192), (140, 165, 200)], 10)
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
                       jitter(rng, (225, 228, 232), 8), T_SKY)  # fmt: skip


def backdrop(street: Street) -> None:
    """The end of the street: a row of far buildings and trees across the view."""
    rng, cam, cv = street.rng, street.cam, street.cv
    x, z = -80.0, street.z_far
    while x < 80:
        w = rng.uniform(6, 20)
        if rng.random() < 0.3:
            c = pick(rng, [(60, 90, 40), (80, 105, 50)])
            for _ in range(4):
                cx, cy = x + rng.uniform(0, w), rng.uniform(3, 10)
                r = rng.uniform(3, 7) * cam.s(z)
                cv.ellipse(*cam.p(cx, cy, z), r, r * 0.8, VEGETATION, c, T_VEG)
            cv.poly(cam.front(x, x + w, z, 0, rng.uniform(3, 6)), VEGETATION, c, T_VEG)
        else:
            h = rng.uniform(8, 32)
            cv.poly(cam.front(x, x + w, z, 0, h), BUILDING, pick(rng, BUILDING_COLORS), T_BUILDING)
            windows_front(street, x, x + w, z, h)
        x += w


def windows_front(street: Street, x0: float, x1: float, z: float, h: float) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    if cam.s(z) * 1.0 < 2:  # windows under ~2 px: skip the draw calls
        return
    col = pick(rng, WINDOW_COLORS, 10)
    floor_h, pitch = rng.uniform(2.8, 3.4), rng.uniform(2.0, 3.2)
    for y in np.arange(2.5, h - 1.5, floor_h):
        for x in np.arange(x0 + pitch * 0.3, x1 - pitch * 0.6, pitch):
            cv.poly(cam.front(x, x + pitch * 0.55, z, y, y + floor_h * 0.55), BUILDING,
                    jitter(rng, col, 12), T_PLAIN)  # fmt: skip


def ground(street: Street) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    zf = street.z_far
    # whatever is not covered below the horizon (side streets, far away) is plain ground
    cv.poly([(0, cam.yh), (cam.width, cam.yh), (cam.width, cam.height), (0, cam.height)], GROUND,
            jitter(rng, (110, 100, 90)), T_ROAD)  # fmt: skip
    asphalt = pick(rng, [(80, 80, 84), (92, 90, 92), (68, 70, 74), (100, 98, 100)], 6)
    cv.poly(cam.ground(street.road_l, street.road_r, 0.3, zf), ROAD, asphalt, T_ROAD)
    if street.parking_w:
        c = np.clip(asphalt + rng.uniform(8, 25) * np.array([1, 0.9, 1.2]), 0, 255)
        cv.poly(cam.ground(street.road_r, street.road_r + street.parking_w, 0.3, zf), PARKING, c, T_ROAD)
        for z in np.arange(rng.uniform(2, 6), zf, 5.5):
            cv.poly(cam.ground(street.road_r, street.road_r + street.parking_w, z, z + 0.15), PARKING, (220,) * 3)
    # rails: the leftmost lane carries a tram track (void), two steel rails on gravel-coloured bed
    tx = street.tram_x
    cv.poly(cam.ground(tx - 1.2, tx + 1.2, 0.3, zf), RAIL, jitter(rng, (112, 102, 92), 8), T_TERRAIN)
    for rx in (tx - 0.75, tx + 0.75):
        cv.poly(cam.ground(rx - 0.06, rx + 0.06, 0.3, zf), RAIL, jitter(rng, (160, 160, 165), 6), T_METAL)
    markings(street, asphalt)
    for s in (-1, 1):
        walk(street, s)


def markings(street: Street, asphalt: np.ndarray) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    white = jitter(rng, (215, 215, 210), 8)
    half = 0.07
    # lane separators between own lanes and the centre line; dashes 3 m every 9 m
    lines = [street.lane_w / 2 + i * street.lane_w for i in range(street.n_right)]
    lines += [-street.lane_w / 2 - i * street.lane_w for i in range(street.n_left)]
    for x in lines:
        solid = x == -street.lane_w / 2 and rng.random() < 0.5
        if solid:
            cv.poly(cam.ground(x - half, x + half, 0.3, street.z_far), ROAD, white, T_PLAIN)
            continue
        for z in np.arange(rng.uniform(0, 9), street.z_far, 9.0):
            cv.poly(cam.ground(x - half, x + half, z, z + 3.0), ROAD, white, T_PLAIN)
    for x in (street.road_l + 0.3, street.road_r - 0.3):  # edge lines
        cv.poly(cam.ground(x - half, x + half, 0.3, street.z_far), ROAD, white, T_PLAIN)
    if rng.random() < 0.5:  # zebra crossing
        z0 = rng.uniform(12, 35)
        for x in np.arange(street.road_l + 0.5, street.road_r - 0.5, 1.0):
            cv.poly(cam.ground(x, x + 0.5, z0, z0 + 3.5), ROAD, white, T_PLAIN)
    for _ in range(rng.integers(0, 3)):  # patches and manholes: asphalt is not one colour
        x, z = rng.uniform(street.road_l, street.road_r), rng.uniform(5, 40)
        c = np.clip(asphalt * rng.uniform(0.85, 1.15), 0, 255)
        cv.poly(cam.ground(x, x + rng.uniform(0.6, 3), z, z + rng.uniform(0.6, 4)), ROAD, c, T_ROAD)


def walk(street: Street, s: int) -> None:
    """Sidewalk with paving joints, curb, then the setback strip (terrain, ground or parking)."""
    rng, cam, cv = street.rng, street.cam, street.cv
    a, b = sorted((street.curb(s), street.walk_out(s)))
    pave = pick(rng, [(168, 166, 162), (178, 150, 146), (150, 150, 152), (186, 180, 168)], 8)
    cv.poly(cam.ground(a, b, 0.3, street.z_far), SIDEWALK, pave, T_SIDEWALK)
    joint = np.clip(pave * 0.8, 0, 255)
    step = rng.uniform(0.8, 1.6)
    for z in np.arange(rng.uniform(0.3, 1.5), min(street.z_far, 40), step):
        cv.poly(cam.ground(a, b, z, z + 0.05), SIDEWALK, joint, T_SIDEWALK)
    c = street.curb(s)
    cv.poly(cam.ground(c - 0.15, c + 0.15, 0.3, street.z_far), SIDEWALK, np.clip(pave * 1.1, 0, 255), T_SIDEWALK)
    # setback: grass strips (terrain) in segments, the rest plain ground
    o, f = sorted((street.walk_out(s), street.facade_x(s)))
    z = 0.3
    while z < street.z_far:
        length = rng.uniform(8, 30)
        kind = rng.random()
        if kind < 0.65:
            grass = pick(rng, [(132, 160, 80), (150, 168, 96), (160, 150, 100), (118, 150, 72)], 10)
            cv.poly(cam.ground(o, f, z, z + length), TERRAIN, grass, T_TERRAIN)
        elif kind < 0.85:
            cv.poly(cam.ground(o, f, z, z + length), SIDEWALK, pave, T_SIDEWALK)
        z += length


def facades(street: Street, s: int) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    x = street.facade_x(s)
    segments = []
    z = 0.5
    while z < street.z_far:
        length = rng.uniform(8, 30)
        segments.append((z, min(z + length, street.z_far), rng.random()))
        z += length + (rng.uniform(6, 15) if rng.random() < 0.2 else 0.0)
    for z0, z1, kind in reversed(segments):  # far to near
        if kind < 0.22:
            tree_row(street, x + s * 1.5, z0, z1)
            continue
        h = rng.uniform(8, 28)
        color = pick(rng, BUILDING_COLORS)
        cv.poly(cam.side(x, z0, z1, 0, h), BUILDING, color, T_BUILDING)
        # the end wall facing us, seen past the gap before this block
        cv.poly(cam.front(x, x + s * 12, z0, 0, h), BUILDING, np.clip(color * 0.85, 0, 255), T_BUILDING)
        windows_side(street, x, z0, z1, h)
        cv.poly(cam.side(x, z0, z1, h - 0.5, h), BUILDING, np.clip(color * 0.7, 0, 255), T_PLAIN)


def windows_side(street: Street, x: float, z0: float, z1: float, h: float) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    col = pick(rng, WINDOW_COLORS, 10)
    floor_h, pitch = rng.uniform(2.8, 3.4), rng.uniform(2.0, 3.4)
    shop = rng.random() < 0.5
    for z in np.arange(z0 + pitch * 0.3, z1 - pitch * 0.6, pitch):
        if cam.s(z) * pitch < 4:  # too far: windows would be sub-pixel
            break
        if shop:
            cv.poly(cam.side(x, z, z + pitch * 0.8, 0.4, 2.6), BUILDING, jitter(rng, col, 15), T_PLAIN)
        for y in np.arange(3.2, h - 1.5, floor_h):
            cv.poly(cam.side(x, z, z + pitch * 0.5, y, y + floor_h * 0.5), BUILDING, jitter(rng, col, 12), T_PLAIN)


def tree_row(street: Street, x: float, z0: float, z1: float) -> None:
    for z in np.arange(z1, z0, -street.rng.uniform(4, 8)):
        tree(street, x, z, big=True)


def tree(street: Street, x: float, z: float, big: bool = False) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    h = rng.uniform(5, 11) if big else rng.uniform(4, 8)
    green = pick(rng, [(52, 82, 34), (70, 100, 42), (44, 70, 40), (86, 110, 50)], 10)
    trunk_w = rng.uniform(0.3, 0.5)
    cv.poly(cam.front(x - trunk_w / 2, x + trunk_w / 2, z, 0, h * 0.6), VEGETATION,
            jitter(rng, (90, 75, 60), 10), T_CLOTH)  # fmt: skip
    r = h * rng.uniform(0.25, 0.4)
    for _ in range(rng.integers(3, 6)):
        cx, cy = cam.p(x + rng.normal(0, r * 0.4), h * 0.7 + rng.normal(0, r * 0.3), z)
        rr = r * rng.uniform(0.6, 1.0) * cam.s(z)
        cv.ellipse(cx, cy, rr, rr * rng.uniform(0.8, 1.1), VEGETATION, jitter(rng, green, 8), T_VEG)


def hedge(street: Street, s: int, z0: float, z1: float) -> None:
    x = street.walk_out(s) + s * 0.6
    h = street.rng.uniform(0.8, 1.6)
    green = pick(street.rng, [(52, 82, 34), (70, 100, 42), (44, 70, 40)], 10)
    street.cv.poly(street.cam.side(x, z0, z1, 0, h), VEGETATION, green, T_VEG)
    street.cv.poly(street.cam.front(x, x + s * 0.9, z0, 0, h), VEGETATION, green * 0.9, T_VEG)


def barrier(street: Street, s: int, z0: float, z1: float, label: int) -> None:
    """A wall or fence along the outer edge of the sidewalk: long side face plus its near end."""
    rng, cam, cv = street.rng, street.cam, street.cv
    x = street.walk_out(s) + s * 0.2
    if label == WALL:
        h = rng.uniform(1.2, 2.5)
        c = pick(rng, [(128, 128, 142), (150, 146, 150), (118, 114, 128), (160, 150, 140)], 8)
        cv.poly(cam.side(x, z0, z1, 0, h), WALL, c, T_WALL)
        cv.poly(cam.front(x, x + s * 0.35, z0, 0, h), WALL, c * 0.85, T_WALL)
        cv.poly(cam.side(x, z0, z1, h - 0.12, h), WALL, np.clip(c * 1.15, 0, 255), T_PLAIN)  # coping
    else:
        h = rng.uniform(1.3, 2.4)
        c = pick(rng, [(110, 120, 108), (130, 100, 70), (150, 150, 150), (80, 100, 90)], 10)
        cv.poly(cam.side(x, z0, z1, 0, h), FENCE, c, T_FENCE)
        for z in np.arange(z0, z1, rng.uniform(2.0, 3.0)):  # posts
            cv.poly(cam.side(x, z, z + 0.12, 0, h + 0.05), FENCE, c * 0.7, T_METAL)
        cv.poly(cam.side(x, z0, z1, h - 0.08, h), FENCE, c * 0.75, T_METAL)


def guard_rail(street: Street, z0: float, z1: float) -> None:
    x = street.road_l - 0.3
    c = jitter(street.rng, (170, 170, 175), 8)
    street.cv.poly(street.cam.side(x, z0, z1, 0.45, 0.8), GUARD_RAIL, c, T_WALL)
    for z in np.arange(z0, z1, 2.0):
        street.cv.poly(street.cam.side(x, z, z + 0.12, 0, 0.75), GUARD_RAIL, c * 0.7, T_METAL)


def ego(street: Street) -> None:
    """The car we sit in: a hood at the bottom of every Cityscapes frame (void)."""
    rng, cam, cv = street.rng, street.cam, street.cv
    top = cam.height * rng.uniform(0.88, 0.93)
    edge = top + cam.height * rng.uniform(0.02, 0.05)
    W = cam.width
    pts = [(0, cam.height), (0, edge), (W * 0.2, top + (edge - top) * 0.3), (W * 0.5, top),
           (W * 0.8, top + (edge - top) * 0.3), (W, edge), (W, cam.height)]  # fmt: skip
    c = pick(rng, [(30, 30, 34), (60, 62, 66), (150, 152, 156)], 6)
    cv.poly(pts, EGO, c, T_METAL)
    cv.poly([(W * 0.35, top + 3), (W * 0.65, top + 3), (W * 0.6, cam.height), (W * 0.4, cam.height)], EGO,
            np.clip(c * 1.3 + 10, 0, 255), T_METAL)  # fmt: skip
