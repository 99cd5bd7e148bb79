"""The cell_labels objective's targets and its refusal of folders it cannot use."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.data.shapes import COLORS, SHAPES, SIZES
from vlmkit.errors import ConfigError
from vlmkit.objectives.cell_labels import CellLabelHeads, cell_labels, read_scenes


def obj(color, shape, cx, cy, side, size="small"):
    return {"color": color, "shape": shape, "size": size, "center": [cx, cy],
            "bbox": [cx - side / 2, cy - side / 2, side, side]}


def test_cell_labels_mark_the_cells_under_each_object_and_the_nearest_wins():
    # 64x32 canvas, 4x2 grid of 16px cells with centres x = 8, 24, 40, 56 and y = 8, 24
    scene = {"width": 64, "height": 32, "objects": [
        obj("red", "circle", 8, 8, 12),       # reach 6: covers only the cell centred at (8, 8)
        obj("blue", "star", 40, 24, 40, "large"),  # reach 20: (24, 24), (40, 24), (56, 24), (40, 8); not the
                                              # diagonal (24, 8) and (56, 8), 22.6 away
        obj("green", "square", 30, 24, 4),    # reach 2: covers no cell centre; nearer to (24, 24) but too small
    ]}
    y = cell_labels(scene, (2, 4))
    red, blue = 1 + list(COLORS).index("red"), 1 + list(COLORS).index("blue")
    circle, star = 1 + SHAPES.index("circle"), 1 + SHAPES.index("star")
    assert y[0].tolist() == [[red, 0, blue, 0], [0, blue, blue, blue]]
    assert y[1].tolist() == [[circle, 0, star, 0], [0, star, star, star]]
    small, large = 1 + list(SIZES).index("small"), 1 + list(SIZES).index("large")
    assert y[2].tolist() == [[small, 0, large, 0], [0, large, large, large]]
    # overlapping disks: (56, 24) is 6 from a new circle at (50, 24) and 16 from the star, so the circle wins
    scene["objects"].append(obj("red", "circle", 50, 24, 20))
    y = cell_labels(scene, (2, 4))
    assert (y[0, 1, 3], y[1, 1, 3]) == (red, circle) and (y[0, 1, 2], y[1, 1, 2]) == (blue, star)


def test_read_scenes_refuses_a_folder_without_training_scenes(tmp_path):
    with pytest.raises(ConfigError, match=r"needs ShapesWorld's object annotations, .*scenes\.json"):
        read_scenes(tmp_path)
    (tmp_path / "scenes.json").write_text(json.dumps([{"split": "val", "objects": []}]))
    with pytest.raises(ConfigError, match=r"scenes\.json has no scenes in the 'train' split"):
        read_scenes(tmp_path)


def test_where_heads_learn_each_cells_row_and_column_in_reading_order():
    """A stage's ``where: true``: the heads also predict the row and the column of every cell, the tower's tokens
    taken in reading order (row by row); features that tell the cells apart are enough to learn them."""
    torch.manual_seed(0)
    gh, gw = 2, 4
    heads = CellLabelHeads(gh * gw, (gh, gw))
    feats = torch.eye(gh * gw).expand(3, -1, -1)  # each cell its own one-hot feature
    labels = torch.zeros(3, 3, gh, gw, dtype=torch.long)  # no objects: only where is to learn
    opt = torch.optim.Adam(heads.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss, _, objects, _ = heads.loss_and_hits(feats, labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    loss, _, objects, where = heads.loss_and_hits(feats, labels)
    assert objects == 0 and where == 3 * gh * gw and float(loss.detach()) < 0.1 * losses[0]
    assert heads.row(feats[0]).argmax(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert heads.column(feats[0]).argmax(-1).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    plain = CellLabelHeads(gh * gw)  # without a grid: colour, shape and size only
    assert not hasattr(plain, "row") and plain.loss_and_hits(feats, labels)[3] == 0
