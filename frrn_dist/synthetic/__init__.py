"""Synthetic Cityscapes: procedurally drawn street scenes written in the official folder layout (a package).

Imports: frrn_dist.synthetic.dataset, frrn_dist.synthetic.layout (re-exported here).

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

Modules, each importing only those above it:
    palette.py   label ids, texture weights, colour palettes
    render.py    the region map (Canvas) and its rendering to RGB / labelIds / instanceIds
    geometry.py  the pinhole camera and one frame's street layout (lanes, sidewalks, facades)
    scenery.py   static scenery painters (sky, road, sidewalks, facades, trees, walls, fences)
    objects.py   object painters (poles, signs, lights, people, two-wheelers, vehicles, clutter)
    layout.py    where the objects go, and draw_scene(seed, hw): one frame
    dataset.py   make_dataset (the files on disk) and the CLI; __main__.py runs it
"""

from frrn_dist.synthetic.dataset import (
    FRAME_ID,
    GENERATOR,
    MARKER_NAME,
    TRAIN_CITIES,
    VAL_CITIES,
    main,
    make_dataset,
    parse_hw,
)
from frrn_dist.synthetic.layout import draw_scene

__all__ = [
    "FRAME_ID",
    "GENERATOR",
    "MARKER_NAME",
    "TRAIN_CITIES",
    "VAL_CITIES",
    "draw_scene",
    "main",
    "make_dataset",
    "parse_hw",
]
