"""Batch augmentation: the same random affine on image and label, seeded."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from dunet_deploy.training.augment import (  # noqa: E402
    PAPER_AUGMENT,
    AugmentParams,
    apply_affine,
    augment_batch,
    random_affine,
)

NONE = AugmentParams(shift=0.0, zoom=0.0, rotation=0.0, hflip=False)


def _batch(n: int = 6, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 4, size, size, generator=g)
    labels = torch.zeros(n, 1, size, size)
    labels[:, :, 10:20, 8:14] = 1.0  # an off-centre block, so flips and shifts show
    return images, labels


def test_identity_params_leave_the_batch_unchanged():
    images, labels = _batch()
    out_img, out_lab = augment_batch(images, labels, torch.Generator().manual_seed(1), NONE)
    torch.testing.assert_close(out_img, images, atol=1e-5, rtol=0)
    assert torch.equal(out_lab, labels)


def test_flip_only_reverses_columns_of_image_and_label_alike():
    images, labels = _batch(n=16)
    params = AugmentParams(shift=0.0, zoom=0.0, rotation=0.0, hflip=True)
    theta = random_affine(16, torch.Generator().manual_seed(3), params, size=(32, 32))
    flipped = theta[:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < 16  # both outcomes occur
    out_img, out_lab = apply_affine(images, labels, theta)
    for i in range(16):
        want_img = images[i].flip(-1) if flipped[i] else images[i]
        want_lab = labels[i].flip(-1) if flipped[i] else labels[i]
        torch.testing.assert_close(out_img[i], want_img, atol=1e-5, rtol=0)
        assert torch.equal(out_lab[i], want_lab)


def test_parameters_stay_in_the_papers_ranges():
    gen = torch.Generator().manual_seed(0)
    theta = random_affine(2000, gen, PAPER_AUGMENT, size=(48, 48)).double()
    a = theta[:, :, :2]
    # Square images: A = R(angle) @ diag(zx * flip, zy); columns have norms zx, zy.
    zx, zy = a[:, :, 0].norm(dim=1), a[:, :, 1].norm(dim=1)
    for z in (zx, zy):
        assert z.min() >= 0.8 - 1e-6 and z.max() <= 1.2 + 1e-6
        assert z.min() < 0.82 and z.max() > 1.18  # the whole range is used
    # Column 1 is zy * (-sin, cos), untouched by the flip.
    rot_angle = torch.atan2(-a[:, 0, 1], a[:, 1, 1])
    assert rot_angle.abs().max() <= math.radians(20) + 1e-6
    assert rot_angle.abs().max() > math.radians(19)
    det = torch.linalg.det(a)
    assert ((det < 0).double().mean() - 0.5).abs() < 0.05  # horizontal flips half the time
    t = theta[:, :, 2]
    assert t.abs().max() <= 0.2 + 1e-6 and t.abs().max() > 0.19  # shift 0.1 of the size


def test_same_generator_seed_same_result_and_labels_stay_binary():
    images, labels = _batch()
    a = augment_batch(images, labels, torch.Generator().manual_seed(7))
    b = augment_batch(images, labels, torch.Generator().manual_seed(7))
    c = augment_batch(images, labels, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert set(torch.unique(a[1]).tolist()) <= {0.0, 1.0}
    assert a[0].shape == images.shape and a[1].shape == labels.shape


def test_image_and_label_get_the_same_transform():
    # An image channel that *is* the label: after augmentation the bilinear
    # image thresholded at 0.5 must agree with the nearest-neighbour label.
    _, labels = _batch(n=32, size=48)
    images = labels.repeat(1, 4, 1, 1)
    out_img, out_lab = augment_batch(images, labels, torch.Generator().manual_seed(11))
    agree = ((out_img[:, :1] >= 0.5) == (out_lab >= 0.5)).float().mean().item()
    assert agree > 0.995
    # ... and the transform really moved things.
    assert not torch.equal(out_lab, labels)


def test_aspect_ratio_is_respected_for_rotations():
    # random_affine's own rotations of a non-square image are true rotations in pixel
    # space: a 20 px bar keeps its length at any angle. Without the aspect correction a
    # 60 degree turn of a 32x64 image would shrink it to about 13 px.
    h, w = 32, 64
    params = AugmentParams(shift=0.0, zoom=0.0, rotation=90.0, hflip=False)
    gen = torch.Generator().manual_seed(5)
    theta = random_affine(12, gen, params, size=(h, w))
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0] * h / w, theta[:, 0, 0]))
    steep = theta[angles.abs() > 30]
    assert steep.shape[0] >= 3  # the test exercises real rotations
    label = torch.zeros(steep.shape[0], 1, h, w)
    label[:, 0, 16, 22:42] = 1  # 20 px wide, centred
    _, out = apply_affine(label.clone(), label, steep)
    for k in range(steep.shape[0]):
        pts = out[k, 0].nonzero().float()
        length = torch.cdist(pts, pts).max().item() + 1
        assert abs(length - 20) <= 2, (k, length)


def test_shape_errors():
    with pytest.raises(ValueError):
        apply_affine(torch.zeros(2, 4, 8, 8), torch.zeros(3, 1, 8, 8), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError):
        apply_affine(torch.zeros(2, 4, 8, 8), torch.zeros(2, 1, 8, 16), torch.zeros(2, 2, 3))
