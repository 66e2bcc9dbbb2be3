"""The Cityscapes label table, taken from cityscapesscripts (never a hand copy), as numpy lookup tables.

Imports: numpy, cityscapesscripts (nothing of frrn_dist: everything else imports this).

Label ids (0..33, as in *_gtFine_labelIds.png) are what the official evaluator reads; train ids (0..18, 255 = ignore)
are what the network predicts. Every conversion in the project goes through the tables below.
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import category2labels, labels, trainId2label

NUM_CLASSES = 19
IGNORE_INDEX = 255
NUM_LABEL_IDS = 34  # label ids 0..33; license plate (-1) is never drawn in the PNGs

# labelId -> trainId for every uint8 value, so LUT[labelIds_png] is one numpy index; unknown ids map to ignore.
ID_TO_TRAIN = np.full(256, IGNORE_INDEX, np.uint8)
for _l in labels:
    if _l.id >= 0 and 0 <= _l.trainId < IGNORE_INDEX:
        ID_TO_TRAIN[_l.id] = _l.trainId

# trainId -> labelId for writing predictions in the official format: [7, 8, 11, ..., 33].
TRAIN_TO_ID = np.array([trainId2label[t].id for t in range(NUM_CLASSES)], np.uint8)

CLASS_NAMES: list[str] = [trainId2label[t].name for t in range(NUM_CLASSES)]

# Cityscapes palette by trainId (ignore drawn black), for colour masks and overlays.
TRAIN_COLORS = np.zeros((256, 3), np.uint8)
for _t in range(NUM_CLASSES):
    TRAIN_COLORS[_t] = trainId2label[_t].color

# labelId -> RGB, as in *_gtFine_color.png (several ids share a colour, so this is not invertible).
ID_COLORS = np.zeros((256, 3), np.uint8)
for _l in labels:
    if _l.id >= 0:
        ID_COLORS[_l.id] = _l.color

VALID_LABEL_IDS = frozenset(_l.id for _l in labels if _l.id >= 0)

# Label ids whose objects carry instance ids (id * 1000 + k in *_instanceIds.png): person ... bicycle, including
# caravan and trailer, which are ignored in evaluation.
INSTANCE_LABEL_IDS = frozenset(_l.id for _l in labels if _l.hasInstances and _l.id >= 0)

# The 8 evaluated instance classes, as train ids (person, rider, car, truck, bus, train, motorcycle, bicycle).
INSTANCE_TRAIN_IDS: list[int] = [t for t in range(NUM_CLASSES) if trainId2label[t].hasInstances]

# Categories that contain evaluated classes, in table order: flat, construction, object, nature, sky, human, vehicle.
CATEGORY_NAMES: list[str] = [c for c in category2labels if any(not lab.ignoreInEval for lab in category2labels[c])]
# trainId -> category index into CATEGORY_NAMES
TRAIN_TO_CATEGORY = np.array([CATEGORY_NAMES.index(trainId2label[t].category) for t in range(NUM_CLASSES)], np.int64)

# Categories whose every label (id >= 0) has instances: these get a category iIoU (human, vehicle).
INSTANCE_CATEGORY_NAMES: list[str] = [
    c for c in CATEGORY_NAMES if all(lab.hasInstances for lab in category2labels[c] if lab.id >= 0)
]


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 label ids -> (H, W) uint8 train ids, 255 for every ignored or unknown id."""
    return ID_TO_TRAIN[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) integer train ids 0..18 -> (H, W) uint8 label ids, the official prediction format."""
    return TRAIN_TO_ID[np.asarray(train_ids, np.int64)]


def colorize_train_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 Cityscapes colours; ignore (255) is black."""
    return TRAIN_COLORS[np.asarray(train_ids, np.uint8)]
