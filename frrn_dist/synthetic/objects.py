"""Objects in a synthetic street, painted onto the Street's canvas: poles with signs and lights, people, bicycles
and motorcycles with or without riders, cars, trucks, buses, trams and sidewalk clutter.

Imports: numpy, frrn_dist.synthetic.geometry, frrn_dist.synthetic.palette.

Each person, rider, two-wheeler and vehicle gets its own object id from the canvas, so all of its regions
(windows, wheels, helmet) count as one instance. Every painter takes the Street first and draws with its
rng, so the order of calls fixes the frame.
"""

from __future__ import annotations

import numpy as np

from frrn_dist.synthetic.geometry import Street
from frrn_dist.synthetic.palette import (
    BICYCLE,
    BIKE_COLORS,
    BUS,
    BUS_COLORS,
    CAR,
    CAR_COLORS,
    CLOTH_COLORS,
    HELMET_COLORS,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    SIGN,
    SKIN_COLORS,
    STATIC,
    T_CARGO,
    T_CLOTH,
    T_METAL,
    T_PLAIN,
    T_SPOKES,
    TRAIN,
    TRAM_COLORS,
    TRUCK,
    TRUCK_COLORS,
    WINDOW_COLORS,
    jitter,
    pick,
)

# poles, signs, lights


def pole(street: Street, x: float, z: float, kind: str) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    w = rng.uniform(0.4, 0.55)  # fat: real poles are ~0.15 m but vanish at 1/16 scale
    c = pick(rng, [(140, 140, 142), (118, 120, 118), (70, 84, 74), (160, 160, 155)], 8)
    h = {"sign": rng.uniform(2.8, 3.8), "light": rng.uniform(3.6, 5.0), "lamp": rng.uniform(6, 9)}[kind]
    cv.poly(cam.front(x - w / 2, x + w / 2, z, 0, h), POLE, c, T_METAL)
    cv.poly(cam.front(x - w / 6, x + w / 10, z, 0, h), POLE, np.clip(c * 1.2, 0, 255), T_METAL)  # highlight
    if kind == "sign":
        sign(street, x, h - 0.3, z)
        if rng.random() < 0.4:
            sign(street, x, h - 1.2, z)
    elif kind == "light":
        light(street, x, h, z, w)
    else:
        arm = -np.sign(x) * rng.uniform(1.5, 3.0)
        cv.poly([cam.p(x, h - 0.15, z), cam.p(x + arm, h, z), cam.p(x + arm, h + 0.15, z), cam.p(x, h, z)],
                POLE, c, T_METAL)  # fmt: skip
        cv.poly(cam.front(x + arm - 0.5, x + arm + 0.5, z, h - 0.25, h + 0.05), POLE, (200, 200, 190), T_METAL)


def sign(street: Street, x: float, y: float, z: float) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    r = rng.uniform(0.5, 0.7)
    cx, cy = cam.p(x, y, z)
    rp = r * cam.s(z)
    shape = rng.integers(4)
    red, white, blue, yellow = (205, 30, 34), (232, 232, 230), (30, 80, 176), (236, 196, 20)
    if shape == 0:  # prohibition: red ring, white disc
        cv.ellipse(cx, cy, rp, rp, SIGN, jitter(rng, red, 8), T_PLAIN)
        cv.ellipse(cx, cy, rp * 0.75, rp * 0.75, SIGN, jitter(rng, white, 6), T_PLAIN)
    elif shape == 1:  # mandatory: blue disc, white arrow
        cv.ellipse(cx, cy, rp, rp, SIGN, jitter(rng, blue, 8), T_PLAIN)
        cv.poly([(cx - rp * 0.15, cy + rp * 0.6), (cx + rp * 0.15, cy + rp * 0.6), (cx + rp * 0.15, cy - rp * 0.1),
                 (cx + rp * 0.4, cy - rp * 0.1), (cx, cy - rp * 0.6), (cx - rp * 0.4, cy - rp * 0.1),
                 (cx - rp * 0.15, cy - rp * 0.1)], SIGN, jitter(rng, white, 6))  # fmt: skip
    elif shape == 2:  # warning: red triangle
        up = rng.random() < 0.7
        k = -1 if up else 1
        tri = [(cx, cy + k * rp), (cx - rp, cy - k * rp * 0.75), (cx + rp, cy - k * rp * 0.75)]
        cv.poly(tri, SIGN, jitter(rng, red, 8))
        cv.poly([(cx + (px - cx) * 0.6, cy + (py - cy) * 0.6) for px, py in tri], SIGN, jitter(rng, white, 6))
    else:  # information: blue or yellow rectangle with a white field
        c = blue if rng.random() < 0.6 else yellow
        wr = rp * rng.uniform(1.0, 1.6)
        cv.poly([(cx - wr, cy - rp), (cx + wr, cy - rp), (cx + wr, cy + rp), (cx - wr, cy + rp)], SIGN,
                jitter(rng, c, 8))  # fmt: skip
        cv.poly([(cx - wr * 0.7, cy - rp * 0.3), (cx + wr * 0.7, cy - rp * 0.3), (cx + wr * 0.7, cy + rp * 0.3),
                 (cx - wr * 0.7, cy + rp * 0.3)], SIGN, jitter(rng, white, 6))  # fmt: skip


def light(street: Street, x: float, y: float, z: float, pole_w: float) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    w, h = rng.uniform(0.6, 0.75), rng.uniform(1.3, 1.6)
    housing = pick(rng, [(30, 32, 30), (44, 46, 40), (24, 26, 28), (70, 66, 40)], 6)
    cv.poly(cam.front(x - w / 2, x + w / 2, z, y - h, y), LIGHT, housing, T_PLAIN)
    lit = rng.integers(3)
    lamps = [(225, 40, 30), (240, 180, 30), (40, 215, 100)]
    for i in range(3):
        cx, cy = cam.p(x, y - h * (0.2 + 0.3 * i), z)
        c = lamps[i] if i == lit else np.asarray(lamps[i]) * 0.3 + 20
        r = w * 0.3 * cam.s(z)
        cv.ellipse(cx, cy, r, r, LIGHT, jitter(rng, c, 8), T_PLAIN)


# people and two-wheelers (billboards in the plane Z = z)


def person(street: Street, x: float, z: float) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    o = cv.new_object(PERSON)
    h = rng.uniform(1.55, 1.95)
    w = h * rng.uniform(0.3, 0.36)  # shoulders incl. arms and bags
    legs, shirt = pick(rng, CLOTH_COLORS[:6] + [(40, 50, 80)], 12), pick(rng, CLOTH_COLORS, 16)
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
    cv.ellipse(cx, cy, r, r * 1.15, PERSON, pick(rng, SKIN_COLORS, 10), T_PLAIN, o)
    cv.ellipse(cx, cy - r * 0.4, r * 1.02, r * 0.8, PERSON, pick(rng, [(30, 25, 20), (90, 60, 30)]), T_PLAIN, o)
    if rng.random() < 0.3:  # a bag
        cv.poly(cam.front(x + w * 0.35, x + w * 0.6, z, h * 0.35, h * 0.6), PERSON, pick(rng, CLOTH_COLORS), T_CLOTH, o)


def two_wheeler(street: Street, x: float, z: float, motor: bool, rider: bool) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    label = MOTORCYCLE if motor else BICYCLE
    o = cv.new_object(label)
    d = 1 if rng.random() < 0.5 else -1  # facing right or left
    s = cam.s(z)
    wheel_r = (0.32 if motor else 0.34) * rng.uniform(0.95, 1.05)
    base = (1.45 if motor else 1.05) * rng.uniform(0.95, 1.05)
    xb, xf = x - d * base / 2, x + d * base / 2  # back and front wheel centres
    tyre = jitter(rng, (24, 24, 26), 4)
    frame = pick(rng, BIKE_COLORS, 10)
    for xc in (xb, xf):
        cx, cy = cam.p(xc, wheel_r, z)
        cv.ellipse(cx, cy, wheel_r * s, wheel_r * s, label, tyre, T_PLAIN, o)
        inner = (0.55 if motor else 0.82) * wheel_r * s
        cv.ellipse(cx, cy, inner, inner, label, jitter(rng, (120, 120, 125) if motor else (95, 95, 98), 8),
                   T_SPOKES if not motor else T_METAL, o)  # fmt: skip
    if motor:
        body = jitter(rng, (36, 36, 40), 8)
        cv.poly([cam.p(xb, 0.45, z), cam.p(xf - d * 0.15, 0.35, z), cam.p(xf, 0.75, z),
                 cam.p(x + d * 0.35, 1.0, z), cam.p(xb - d * 0.1, 0.85, z)], label, body, T_METAL, o)  # fmt: skip
        cv.poly([cam.p(x - d * 0.05, 0.8, z), cam.p(x + d * 0.45, 0.8, z), cam.p(x + d * 0.4, 1.05, z),
                 cam.p(x, 1.0, z)], label, pick(rng, BIKE_COLORS[1:], 12), T_METAL, o)  # tank  # fmt: skip
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
        rider_on(street, x, z, d, motor)


def rider_on(street: Street, x: float, z: float, d: int, motor: bool) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    o = cv.new_object(RIDER)
    seat_y = 0.95 if motor else 1.0
    hip = (x - d * (0.15 if motor else 0.12), seat_y)
    shoulder = (x + d * (0.1 if motor else 0.2), seat_y + 0.6)
    legs, jacket = pick(rng, CLOTH_COLORS[:6], 12), pick(rng, CLOTH_COLORS, 16)
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
    cv.ellipse(hx, hy, r, r * 1.1, RIDER, pick(rng, SKIN_COLORS, 10), T_PLAIN, o)
    cv.ellipse(hx, hy - r * 0.35, r * 1.15, r * 0.85, RIDER, pick(rng, HELMET_COLORS, 10), T_PLAIN, o)


# vehicles (boxes: the face towards us plus the side face the camera can see)


def vehicle(street: Street, kind: str, x: float, z: float, oncoming: bool = False) -> None:
    rng, cam, cv = street.rng, street.cam, street.cv
    dims = {"car": (1.8, 1.5, 4.4), "truck": (2.5, 3.4, 8.5), "bus": (2.55, 3.2, 12.0), "tram": (2.4, 3.5, 28.0)}
    w, h, length = (v * rng.uniform(0.93, 1.07) for v in dims[kind])
    label = {"car": CAR, "truck": TRUCK, "bus": BUS, "tram": TRAIN}[kind]
    palette = {"car": CAR_COLORS, "truck": TRUCK_COLORS, "bus": BUS_COLORS, "tram": TRAM_COLORS}[kind]
    o = cv.new_object(label)
    body = pick(rng, palette, 10)
    glass = pick(rng, WINDOW_COLORS[:3], 8)
    dark = jitter(rng, (24, 24, 26), 4)
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
            cv.poly(cam.side(sx, z1 - 2.2, z1, 1.2, h * 0.75), label, pick(rng, CAR_COLORS), T_METAL, o)
            cv.poly(cam.side(sx, z1 - 1.4, z1 - 0.3, 1.9, h * 0.7), label, glass, T_PLAIN, o)
            cv.poly(cam.side(sx, z, z1 - 2.4, h * 0.45, h * 0.55), label, body * 0.8, T_PLAIN, o)
        else:  # bus, tram: a long band of windows, a coloured stripe under it
            cv.poly(cam.side(sx, z + 0.5, z1 - 0.5, h * 0.45, h * 0.85), label, glass, T_PLAIN, o)
            for zz in np.arange(z + 1.6, z1 - 0.5, 1.6 if kind == "bus" else 2.2):
                cv.poly(cam.side(sx, zz, zz + 0.15, h * 0.45, h * 0.85), label, body, T_METAL, o)
            stripe = pick(rng, [(200, 30, 30), (30, 30, 30), (40, 120, 60), (30, 60, 160)])
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
            cv.poly(cam.front(a, a + 0.3, z, h * 0.4, h * 0.52), label, jitter(rng, lamp, 10), T_PLAIN, o)
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


def static_thing(street: Street, x: float, z: float) -> None:
    """Bins, bollards, advertising columns: void 'static' clutter on the sidewalk."""
    rng, cam, cv = street.rng, street.cam, street.cv
    kind = rng.integers(3)
    if kind == 0:
        w, h = rng.uniform(0.5, 0.8), rng.uniform(0.9, 1.2)
        c = pick(rng, [(40, 90, 50), (90, 90, 90), (220, 120, 30), (40, 60, 120)])
    elif kind == 1:
        w, h = 0.2, rng.uniform(0.8, 1.0)
        c = pick(rng, [(40, 40, 40), (120, 120, 120)])
    else:
        w, h = rng.uniform(1.0, 1.3), rng.uniform(2.5, 3.2)
        c = pick(rng, [(200, 160, 60), (60, 120, 160), (160, 60, 60), (210, 210, 200)])
    cv.poly(cam.front(x - w / 2, x + w / 2, z, 0, h), STATIC, c, T_CLOTH)
