"""det/masks.py: the stride-4 down-sampling against cv2's (a recorded fixture), pasting against a port of mmdet's
SOLOv2 head, centre of mass and mask boxes against ports of mmdet's loops, COCO segmentations decoded (polygons,
uncompressed and compressed RLE) and their errors, RLE round trips through pycocotools.

tests/data/mmcv_imrescale_masks.npz was written once with mmcv 2.1.0 and OpenCV 5.0 (a throw-away venv, script
outside the repo): 60 random 0/1 masks (noise, ellipses, lines, single pixels, polygons; 8-88 px sides) and
`mmcv.imrescale(mask, 1 / stride)` of each, 50 at stride 4, 5 at 2 and 5 at 8, bit-packed. The same rule matched cv2
on 6000 further random masks there.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from det.masks import center_of_mass, decode_segmentation, downsample_masks, encode_rle, mask_boxes, paste_masks

DATA = Path(__file__).parent / "data"


def cv2_fixture() -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(stride, mask bool [H, W], cv2's down-sampled mask bool [H/s, W/s]) per recorded case."""
    data = np.load(DATA / "mmcv_imrescale_masks.npz")
    cases = []
    for k in range(len(data.files) // 3):
        stride, h, w = data[f"s{k}"].tolist()
        mask = np.unpackbits(data[f"m{k}"], count=h * w).reshape(h, w)
        small = np.unpackbits(data[f"r{k}"], count=(h // stride) * (w // stride)).reshape(h // stride, w // stride)
        cases.append((stride, torch.from_numpy(mask).bool(), torch.from_numpy(small).bool()))
    return cases


def test_downsample_equals_cv2s_bilinear_rescale():
    """Every recorded case exactly; the two rules one would guess instead (nearest: one pixel per cell; a strict
    majority of the 2 x 2) are each wrong somewhere in the fixture, so it can tell them apart."""
    cases = cv2_fixture()
    assert sorted({s for s, _, _ in cases}) == [2, 4, 8] and sum(s == 4 for s, _, _ in cases) == 50
    nearest_wrong = majority_wrong = 0
    for stride, mask, expected in cases:
        assert torch.equal(downsample_masks(mask, stride), expected), stride
        assert torch.equal(downsample_masks(mask[None, None].expand(2, 3, -1, -1), stride)[1, 2], expected)
        nearest_wrong += not torch.equal(mask[stride // 2::stride, stride // 2::stride], expected)
        f = stride // 2 - 1
        votes = mask[f::stride].int() + mask[f + 1::stride]
        majority_wrong += not torch.equal(votes[:, f::stride] + votes[:, f + 1::stride] >= 3, expected)
    assert nearest_wrong > 10 and majority_wrong > 10
    with pytest.raises(ValueError, match="even stride that divides"):
        downsample_masks(torch.zeros(6, 8, dtype=torch.bool), 4)


def mmdet_paste(probs: torch.Tensor, img_shape: tuple[int, int], ori_shape: tuple[int, int]) -> torch.Tensor:
    """mmdet 3.3.0 SOLOV2Head._predict_by_feat_single's last lines, as written there (featmap_size is the mask
    feature's, mask_stride 4, cfg.mask_thr 0.5)."""
    featmap_size, h, w = probs.shape[-2:], *img_shape
    upsampled_size = (featmap_size[0] * 4, featmap_size[1] * 4)
    mask_preds = F.interpolate(probs.unsqueeze(0), size=upsampled_size, mode="bilinear", align_corners=False)[
        :, :, :h, :w]
    mask_preds = F.interpolate(mask_preds, size=ori_shape, mode="bilinear", align_corners=False).squeeze(0)
    return mask_preds > 0.5


def test_paste_masks_is_mmdets_two_interpolations_and_crop():
    """20 masks (two chunks of 16), an image smaller than its 64 x 96 canvas, to a file both larger and smaller."""
    torch.manual_seed(0)
    probs = torch.rand(20, 16, 24)
    probs[:, 4:9, 6:15] += 0.6  # blobs, so the threshold cuts through smooth slopes as well as noise
    probs = probs.clamp(0, 1)
    for image_size, orig_size in (((61, 90), (122, 180)), ((64, 77), (40, 49)), ((33, 96), (33, 96))):
        pasted = paste_masks(probs, image_size, orig_size)
        assert pasted.dtype == torch.bool and pasted.shape == (20, *orig_size)
        assert torch.equal(pasted, mmdet_paste(probs, image_size, orig_size))
        assert torch.equal(paste_masks(probs, image_size, orig_size, chunk=3), pasted)
    assert paste_masks(torch.zeros(0, 16, 24), (61, 90), (122, 180)).shape == (0, 122, 180)
    assert not paste_masks(probs, (61, 90), (122, 180), threshold=1.0).any()


def test_center_of_mass_is_mmdets_formula():
    """mmdet.models.utils.center_of_mass per mask (bool mask times arange grids, over the clamped count); batched
    over leading dims; an empty mask gives (0, 0)."""
    torch.manual_seed(0)
    masks = torch.rand(2, 3, 37, 53) < 0.1
    masks[0, 1] = False
    masks[1, 2] = False
    masks[1, 2, 36, 52] = True  # one pixel at the far corner
    got = center_of_mass(masks)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 2)
    for b in range(2):
        for m in range(3):
            mask = masks[b, m]
            normalizer = mask.sum().float().clamp(min=1e-6)
            center_h = (mask * torch.arange(37)[:, None]).sum() / normalizer
            center_w = (mask * torch.arange(53)).sum() / normalizer
            assert got[b, m].tolist() == [center_h.item(), center_w.item()], (b, m)
    assert got[0, 1].tolist() == [0.0, 0.0] and got[1, 2].tolist() == [36.0, 52.0]
    assert torch.equal(center_of_mass(masks.to(torch.uint8)), got)


def test_mask_boxes_are_mmdets_mask2bbox():
    masks = torch.zeros(4, 20, 30, dtype=torch.bool)
    masks[0, 3:7, 5:12] = True
    masks[1, 0, 29] = True  # one pixel in the top right corner
    masks[2, 2:18:5, 1:28:9] = True  # scattered: the extent of all of them
    boxes = mask_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[5, 3, 12, 7], [29, 0, 30, 1], [1, 2, 20, 18], [0, 0, 0, 0]]
    for mask, box in zip(masks, boxes, strict=True):  # mmdet.structures.mask.mask2bbox's loop
        x, y = torch.where(mask.any(0))[0], torch.where(mask.any(1))[0]
        expected = [x[0], y[0], x[-1] + 1, y[-1] + 1] if len(x) else [0, 0, 0, 0]
        assert box.tolist() == [float(v) for v in expected]


def test_rle_round_trip_through_pycocotools():
    torch.manual_seed(0)
    masks = torch.rand(3, 41, 29) < 0.4
    masks[2] = False
    rles = encode_rle(masks)
    assert [r["size"] for r in rles] == [[41, 29]] * 3 and all(isinstance(r["counts"], str) for r in rles)
    rles = json.loads(json.dumps(rles))  # as a results file holds them
    for mask, rle in zip(masks, rles, strict=True):
        assert torch.equal(torch.from_numpy(mask_utils.decode(rle)).bool(), mask)
        assert mask_utils.area(rle) == mask.sum()
    assert encode_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []


def test_decode_polygons_and_rles():
    """A 10 x 6 rectangle's polygon covers its 60 pixels; the parts of an object are merged; a part of under 3
    points (4 numbers, an odd 7) is dropped, as mmdet's LoadAnnotations; an uncompressed RLE (column-major counts)
    and the compressed RLE of a mask decode to what they encode, with str or bytes counts."""
    rect = [2, 1, 12, 1, 12, 7, 2, 7]
    mask = decode_segmentation([rect], 10, 16, 1)
    assert mask.dtype == np.uint8 and mask.shape == (10, 16) and set(np.unique(mask)) == {0, 1}
    assert mask.sum() == 60 and mask[1:7, 2:12].all()
    two = decode_segmentation([rect, [13, 8, 15, 8, 15, 10, 13, 10]], 10, 16, 2)
    assert two.sum() == 64 and two[8:10, 13:15].all()
    assert np.array_equal(decode_segmentation([rect, [0, 0, 3, 3], [1, 1, 5, 1, 5, 5, 1]], 10, 16, 3), mask)
    uncompressed = {"size": [4, 3], "counts": [1, 2, 4, 2, 3]}  # column-major: 0 1 1 0, 0 0 0 1, 1 0 0 0
    expected = np.zeros((4, 3), np.uint8)
    expected[1:3, 0] = 1
    expected[3, 1] = expected[0, 2] = 1
    assert np.array_equal(decode_segmentation(uncompressed, 4, 3, 4), expected)
    compressed = mask_utils.encode(np.asfortranarray(mask))
    assert np.array_equal(decode_segmentation(compressed, 10, 16, 5), mask)
    assert np.array_equal(decode_segmentation(dict(compressed, counts=compressed["counts"].decode()), 10, 16, 6), mask)


@pytest.mark.parametrize("segmentation,message", [
    ([[0, 0, 3, 3], [1, 1, 2]], "annotation 7 has no polygon of 3 or more points"),
    ([], "annotation 7 has no polygon of 3 or more points"),
    ({"size": [10, 17], "counts": "PP3"}, r"annotation 7 has an RLE of size \[10, 17\], but its image is \[10, 16\]"),
    ({"size": [16, 10], "counts": [3, 4]}, r"annotation 7 has an RLE of size \[16, 10\]"),
    ([2, 1, 12, 1, 12, 7], "annotation 7 has a segmentation that is neither a list of polygons"),
    ({"size": [10, 16]}, "annotation 7 has a segmentation that is neither a list of polygons nor an RLE dict"),
    ("polygon", "annotation 7 has a segmentation that is neither"),
    (None, "annotation 7 has a segmentation that is neither"),
    ([["a", "b", "c", "d", "e", "f"]], "annotation 7 has a segmentation pycocotools cannot decode"),
])
def test_bad_segmentations_name_the_annotation(segmentation, message):
    with pytest.raises(ValueError, match=message):
        decode_segmentation(segmentation, 10, 16, 7)
