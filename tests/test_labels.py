"""The label LUTs of frrn_dist.data.labels against cityscapesscripts' own table, label by label."""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import category2labels, id2label, labels, name2label

from frrn_dist.data import labels as L

EVALUATED = sorted((lab for lab in labels if not lab.ignoreInEval), key=lambda lab: lab.trainId)


def test_id_to_train_matches_every_label_of_the_table():
    for lab in labels:
        if lab.id < 0:
            continue  # license plate: never drawn in the PNGs
        expected = lab.trainId if 0 <= lab.trainId < 255 else 255
        assert L.ID_TO_TRAIN[lab.id] == expected, lab.name
    unknown = [i for i in range(256) if i not in id2label]
    assert (L.ID_TO_TRAIN[unknown] == L.IGNORE_INDEX).all()
    assert L.ID_TO_TRAIN.dtype == np.uint8 and L.ID_TO_TRAIN.shape == (256,)


def test_exactly_the_evaluated_labels_get_train_ids_0_to_18():
    assert L.NUM_CLASSES == len(EVALUATED) == 19
    assert [lab.trainId for lab in EVALUATED] == list(range(19))
    trained = sorted(int(t) for t in L.ID_TO_TRAIN if t != 255)
    assert trained == list(range(19))  # each train id reached from exactly one label id
    # the documented order (cityscapes.md): label ids of train ids 0..18
    assert L.TRAIN_TO_ID.tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def test_train_to_id_inverts_id_to_train():
    assert L.TRAIN_TO_ID.tolist() == [lab.id for lab in EVALUATED]
    assert (L.ID_TO_TRAIN[L.TRAIN_TO_ID] == np.arange(19)).all()
    t = np.random.default_rng(0).integers(0, 19, (7, 9))
    assert (L.label_ids_to_train_ids(L.train_ids_to_label_ids(t)) == t).all()


def test_label_ids_to_train_ids_on_an_image():
    ids = np.array([[0, 7, 8, 9], [24, 26, 33, 34], [1, 255, 11, 23]], np.uint8)
    expected = [[id2label[i].trainId if i in id2label and 0 <= id2label[i].trainId < 255 else 255 for i in row]
                for row in ids.tolist()]  # fmt: skip
    assert L.label_ids_to_train_ids(ids).tolist() == expected


def test_class_names_and_colours():
    assert [lab.name for lab in EVALUATED] == L.CLASS_NAMES
    for lab in EVALUATED:
        assert tuple(L.TRAIN_COLORS[lab.trainId]) == lab.color
    for lab in labels:
        if lab.id >= 0:
            assert tuple(L.ID_COLORS[lab.id]) == lab.color, lab.name
    assert (L.TRAIN_COLORS[255] == 0).all()
    t = np.array([[0, 13], [255, 18]])
    rgb = L.colorize_train_ids(t)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == name2label["car"].color and tuple(rgb[1, 1]) == name2label["bicycle"].color
    assert tuple(rgb[1, 0]) == (0, 0, 0)


def test_categories():
    evaluated_categories = [c for c in category2labels if any(not lab.ignoreInEval for lab in category2labels[c])]
    assert evaluated_categories == L.CATEGORY_NAMES
    assert "void" not in L.CATEGORY_NAMES and len(L.CATEGORY_NAMES) == 7
    for lab in EVALUATED:
        assert L.CATEGORY_NAMES[L.TRAIN_TO_CATEGORY[lab.trainId]] == lab.category, lab.name
    assert L.INSTANCE_CATEGORY_NAMES == ["human", "vehicle"]


def test_instance_classes():
    assert set(L.INSTANCE_LABEL_IDS) == {lab.id for lab in labels if lab.hasInstances and lab.id >= 0}
    assert {id2label[i].name for i in L.INSTANCE_LABEL_IDS} >= {"caravan", "trailer", "person", "bicycle"}
    assert [lab.trainId for lab in EVALUATED if lab.hasInstances] == L.INSTANCE_TRAIN_IDS
    assert [L.CLASS_NAMES[t] for t in L.INSTANCE_TRAIN_IDS] == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"
    ]  # fmt: skip
    assert frozenset(range(34)) == L.VALID_LABEL_IDS
