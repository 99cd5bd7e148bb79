"""Grounding metric: box forms, coordinate conversions (Qwen-VL's /999 grid), IoU cases and the 0.5 threshold."""

from __future__ import annotations

import pytest

from vlmkit.errors import DataError
from vlmkit.eval.metrics.grounding import (
    box_iou,
    grounding_metrics,
    parse_box,
    score_grounding,
    xywh_to_xyxy,
)


def _parsed(text, width=640, height=480, **kw):
    result = parse_box(text, width, height, **kw)
    assert result is not None, text
    return result


# --- forms and conversions -------------------------------------------------------------------------------------


def test_qwen_box_is_divided_by_999_and_scaled_to_the_image():
    # width 999, height 1998: x = v / 999 * 999 = v, y = v / 999 * 1998 = 2 v
    p = _parsed("<ref>the dog</ref><box>(100,200),(500,999)</box>", width=999, height=1998)
    assert p.form == "qwen"
    assert p.box == pytest.approx((100, 400, 500, 1998))
    # the grid's corners (0,0),(999,999) are the image corners
    assert _parsed("<box>(0,0),(999,999)</box>").box == pytest.approx((0, 0, 640, 480))


def test_qwen_pairs_without_tags_and_with_spaces():
    # the official prompt ends with "<box>", so the model writes only "(x1,y1),(x2,y2)</box>"
    assert _parsed("(333,0),(666,999)</box>", width=999, height=100).box == pytest.approx((333, 0, 666, 100))
    p = _parsed("It is at <box>( 333 , 0 ) , ( 666 , 999 )</box>.", width=999, height=100)
    assert p.form == "qwen" and p.box == pytest.approx((333, 0, 666, 100))


def test_qwen_scale_can_be_1000():
    assert _parsed("(500,250),(1000,1000)", width=200, height=400, qwen_scale=1000).box == pytest.approx(
        (100, 100, 200, 400))


def test_normalized_brackets_and_parentheses():
    p = _parsed("[0.1, 0.2, 0.5, 1.0]", width=200, height=100)
    assert p.form == "normalized" and p.box == pytest.approx((20, 20, 100, 100))
    p = _parsed("The object is at (0.25,0.5,0.75,1) in the picture", width=400, height=300)
    assert p.form == "normalized" and p.box == pytest.approx((100, 150, 300, 300))
    assert _parsed("[.5, .5, 1., 1.]", width=10, height=20).box == pytest.approx((5, 10, 10, 20))


def test_pixel_boxes_are_used_as_given():
    p = _parsed("Sure! The box is [12, 30.5, 100, 200] in the image.")
    assert p.form == "pixel" and p.box == pytest.approx((12, 30.5, 100, 200))
    assert _parsed("bbox: (5,6,70,80)").box == pytest.approx((5, 6, 70, 80))


def test_all_values_at_most_one_means_normalized():
    assert _parsed("[0, 0, 1, 1]", width=50, height=40).box == pytest.approx((0, 0, 50, 40))
    assert _parsed("[0, 0, 1, 2]", width=50, height=40).form == "pixel"


def test_first_box_in_the_text_wins():
    text = "[10, 10, 50, 50] or maybe <box>(0,0),(999,999)</box>"
    assert _parsed(text).form == "pixel"
    text = "<box>(0,0),(999,999)</box> or maybe [10, 10, 50, 50]"
    assert _parsed(text).form == "qwen"
    assert _parsed("[1, 2, 3, 4], [5, 6, 7, 8]").box == pytest.approx((1, 2, 3, 4))


@pytest.mark.parametrize("text", ["", "I cannot find it.", "[1, 2, 3]", "(1,2)", "[a, b, c, d]", "<box></box>",
                                  "(1,2),(3)"])
def test_unparsable_text_gives_none(text):
    assert parse_box(text, 100, 100) is None


@pytest.mark.parametrize("width, height", [(0, 10), (10, -1), (float("nan"), 10)])
def test_bad_image_size_is_an_error(width, height):
    with pytest.raises(DataError, match="width|height"):
        parse_box("[1, 2, 3, 4]", width, height)


def test_xywh_to_xyxy():
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10, 20, 40, 60)


# --- IoU -------------------------------------------------------------------------------------------------------


def test_iou_hand_drawn_cases():
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0  # identical
    assert box_iou((0, 0, 2, 2), (3, 3, 5, 5)) == 0.0  # disjoint
    assert box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # touching edge: zero-area intersection
    assert box_iou((0, 0, 2, 2), (3, 0, 5, 2)) == 0.0  # apart in x only, overlapping in y
    assert box_iou((0, 0, 2, 2), (0, 3, 2, 5)) == 0.0  # apart in y only, overlapping in x
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)  # contained: inner area / outer area
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)  # half of each overlaps: 2 / (4 + 4 - 2)
    assert box_iou((0, 0, 3, 2), (1, 1, 4, 4)) == pytest.approx(2 / (6 + 9 - 2))  # corner overlap


@pytest.mark.parametrize("degenerate", [(1, 1, 1, 3), (1, 1, 3, 1), (3, 3, 1, 1), (0, 0, 0, 0)])
def test_degenerate_boxes_have_zero_iou(degenerate):
    assert box_iou(degenerate, (0, 0, 4, 4)) == 0.0
    assert box_iou((0, 0, 4, 4), degenerate) == 0.0


def test_two_zero_area_boxes_give_zero_not_a_division_error():
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0


def test_iou_rejects_malformed_boxes():
    with pytest.raises(DataError, match="box_b"):
        box_iou((0, 0, 1, 1), (0, 0, 1))
    with pytest.raises(DataError, match="target_box"):
        score_grounding("[0, 0, 1, 1]", (0, 0, float("inf"), 1), 10, 10)


# --- scoring and aggregate -------------------------------------------------------------------------------------


def test_threshold_boundary_is_inclusive():
    target = (0, 0, 4, 2)  # area 8
    at = score_grounding("[0, 0, 4, 1]", target, 100, 100)  # IoU = 4 / 8 = 0.5 exactly
    assert at.iou == 0.5 and at.correct
    below = score_grounding("[0, 0, 4, 0.99]", target, 100, 100)  # pixels (a value > 1): IoU 3.96 / 8
    assert below.form == "pixel" and below.iou == pytest.approx(0.495) and not below.correct
    assert score_grounding("[0, 0, 4, 1]", target, 100, 100, threshold=0.6).correct is False


def test_unparsable_prediction_is_a_reported_miss():
    r = score_grounding("there is no such object", (0, 0, 10, 10), 100, 100)
    assert not r.parsed and r.box is None and r.iou == 0.0 and not r.correct and r.score == 0.0


def test_aggregate_counts_hits_iou_and_unparsed():
    target = (0, 0, 100, 100)
    results = [
        score_grounding("<box>(0,0),(999,999)</box>", target, 100, 100),  # IoU 1
        score_grounding("[0, 0, 0.5, 1]", target, 100, 100),  # (0,0,50,100): IoU 0.5, a hit
        score_grounding("[0, 0, 50, 50]", target, 100, 100),  # IoU 0.25, a miss
        score_grounding("no idea", target, 100, 100),  # unparsed
    ]
    assert [r.correct for r in results] == [True, True, False, False]
    m = grounding_metrics(results)
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["mean_iou"] == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)
    assert (m["n"], m["n_unparsed"], m["unparsed_rate"]) == (4, 1, 0.25)


def test_empty_aggregate_is_an_error():
    with pytest.raises(DataError, match="at least one"):
        grounding_metrics([])
