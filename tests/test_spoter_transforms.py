"""SPOTER pose transforms: the batched torch versions against slow, literal per-frame references written from the
spec's sentences (shared/specs/spoter.md, "Normalization" and "Augmentations"), on data that hits every rule."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

import data as st

NOSE, NECK, L_EYE = 0, 1, 3
R_SHOULDER, L_SHOULDER, R_ELBOW, L_ELBOW, R_WRIST, L_WRIST = 6, 7, 8, 9, 10, 11
ARMS = ((NECK, R_SHOULDER, R_ELBOW, R_WRIST), (NECK, L_SHOULDER, L_ELBOW, L_WRIST))  # side 0 right, 1 left
HANDS = (range(12, 33), range(33, 54))
ATOL = 1e-5


# -----------------------------------------------------------------------------
# literal references: one clip (T, 54, 2) at a time, float64, loops over frames and joints
# -----------------------------------------------------------------------------


def reference_normalize(clip, stats):
    """Body normalization, hand normalization, then -0.5, sentence by sentence. `stats` counts the rules hit."""
    clip = np.asarray(clip, dtype=np.float64)
    out = clip.copy()
    last_box = None
    for t in range(len(clip)):
        frame = clip[t]
        shoulder_missing = frame[L_SHOULDER, 0] == 0 or frame[R_SHOULDER, 0] == 0
        neck_or_nose_missing = frame[NECK, 0] == 0 or frame[NOSE, 0] == 0
        # body: reuse the previous box when the frame cannot build its own; none yet -> skip the frame
        if shoulder_missing and neck_or_nose_missing:
            if last_box is None:
                stats['no_box_yet'] += 1
                box = None
            else:
                stats['reused_box'] += 1
                box = last_box
        else:
            if not shoulder_missing:
                stats['hm_shoulders'] += 1
                hm = math.dist(frame[L_SHOULDER], frame[R_SHOULDER])
            else:
                stats['hm_neck_nose'] += 1
                hm = math.dist(frame[NECK], frame[NOSE])
            start = [frame[NECK, 0] - 3 * hm, frame[L_EYE, 1] + hm]
            end = [frame[NECK, 0] + 3 * hm, start[1] - 6 * hm]
            for name, point in (('start', start), ('end', end)):
                for axis in (0, 1):
                    if point[axis] < 0:
                        stats[f'clamped_{name}_{"xy"[axis]}'] += 1
                        point[axis] = 0.0
            box = (start, end)
            last_box = box
        if box is not None:
            start, end = box
            if end[0] - start[0] == 0 or start[1] - end[1] == 0:
                stats['zero_size_body_box'] += 1
            else:
                for j in range(12):
                    if frame[j, 0] != 0:
                        out[t, j, 0] = (frame[j, 0] - start[0]) / (end[0] - start[0])
                        out[t, j, 1] = (frame[j, 1] - end[1]) / (start[1] - end[1])
        # hands: each hand in its own square-ish box over its present joints
        for joints in HANDS:
            present = [j for j in joints if frame[j, 0] != 0]
            if not present:
                stats['empty_hand'] += 1
                continue
            if len(present) == 1:
                stats['one_joint_hand'] += 1
            xs, ys = [frame[j, 0] for j in present], [frame[j, 1] for j in present]
            w, h = max(xs) - min(xs), max(ys) - min(ys)
            if w > h:
                dx = 0.1 * w
                dy = dx + (w - h) / 2
            else:
                dy = 0.1 * h
                dx = dy + (h - w) / 2
            start = (min(xs) - dx, min(ys) - dy)
            end = (max(xs) + dx, max(ys) + dy)
            if end[0] - start[0] == 0 or end[1] - start[1] == 0:
                stats['zero_size_hand_box'] += 1
                continue
            for j in present:
                out[t, j, 0] = (frame[j, 0] - start[0]) / (end[0] - start[0])
                out[t, j, 1] = (frame[j, 1] - start[1]) / (end[1] - start[1])
    return out - 0.5


def reference_rotate_point(point, pivot, degrees):
    a = math.radians(degrees)
    px, py = point[0] - pivot[0], point[1] - pivot[1]
    return [pivot[0] + math.cos(a) * px - math.sin(a) * py, pivot[1] + math.sin(a) * px + math.cos(a) * py]


def reference_rotate(clip, theta):
    out = np.array(clip, dtype=np.float64)
    for t in range(len(out)):
        for j in range(54):
            if out[t, j, 0] != 0:
                out[t, j] = reference_rotate_point(out[t, j], (0.5, 0.5), theta)
    return out


def reference_homography(src, dst):
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rhs.append(u)
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.append(v)
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def reference_corners(r, flip):
    if flip:
        return [(r, 1 - r), (1, 1), (r, r), (1, 0)]
    return [(0, 1), (1 - r, 1 - r), (0, 0), (1 - r, r)]


def reference_perspective(clip, r, flip):
    H = reference_homography([(0, 1), (1, 1), (0, 0), (1, 0)], reference_corners(r, flip))
    out = np.array(clip, dtype=np.float64)
    for t in range(len(out)):
        for j in range(12):
            x, y = out[t, j]
            if x != 0:
                w = H[2, 0] * x + H[2, 1] * y + H[2, 2]
                out[t, j] = [(H[0, 0] * x + H[0, 1] * y + H[0, 2]) / w, (H[1, 0] * x + H[1, 1] * y + H[1, 2]) / w]
    return out


def reference_squeeze(clip, ml, mr):
    out = np.array(clip, dtype=np.float64)
    for t in range(len(out)):
        for j in range(12):
            if out[t, j, 0] != 0:
                out[t, j, 0] = ml + out[t, j, 0] * (1 - ml - mr)
    return out


def reference_arm_rotate(clip, angles):
    """angles[side][k]: degrees at pivot k of that side's chain, 0 = this pivot did not fire."""
    missing = np.asarray(clip)[..., 0] == 0
    out = np.array(clip, dtype=np.float64)
    for side, chain in enumerate(ARMS):
        for k in range(3):
            if angles[side][k] == 0:
                continue
            for t in range(len(out)):
                if missing[t, chain[k]]:
                    continue  # a missing pivot rotates nothing
                pivot = out[t, chain[k]].copy()  # where the earlier pivots have already moved it
                for j in chain[k + 1:]:
                    if not missing[t, j]:
                        out[t, j] = reference_rotate_point(out[t, j], pivot, angles[side][k])
    return out


# -----------------------------------------------------------------------------
# data: plausible skeletons, plus every special case the rules have
# -----------------------------------------------------------------------------


def random_frame(rng):
    f = np.zeros((54, 2))
    neck = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.65)])
    half = rng.uniform(0.06, 0.2)
    f[NECK] = neck
    f[NOSE] = neck + [rng.normal(0, 0.01), rng.uniform(0.08, 0.15)]
    f[2], f[L_EYE] = f[NOSE] + [-0.03, 0.03], f[NOSE] + [0.03, 0.03]
    f[4], f[5] = f[NOSE] + [-0.06, 0.01], f[NOSE] + [0.06, 0.01]
    f[R_SHOULDER], f[L_SHOULDER] = neck + [-half, rng.normal(0, 0.02)], neck + [half, rng.normal(0, 0.02)]
    f[R_ELBOW], f[L_ELBOW] = f[R_SHOULDER] + [-0.05, -0.15], f[L_SHOULDER] + [0.05, -0.15]
    f[R_WRIST], f[L_WRIST] = f[R_ELBOW] + [0.03, -0.12], f[L_ELBOW] + [-0.03, -0.12]
    f[:12] += rng.normal(0, 0.005, (12, 2))
    for joints in HANDS:
        center, size = rng.uniform([0.2, 0.1], [0.8, 0.5]), rng.uniform(0.02, 0.08, 2)
        f[list(joints)] = center + rng.uniform(-1, 1, (21, 2)) * size
    return np.clip(f, 0.01, 0.99)


def random_clip(rng, n_frames, p_joint=0.1, p_key=0.0, p_hand=0.0):
    """n_frames frames; each joint missing with p_joint; shoulders/neck/nose also with p_key; a whole hand with p_hand,
    a hand reduced to one joint with p_hand."""
    clip = np.stack([random_frame(rng) for _ in range(n_frames)])
    clip[rng.random(clip.shape[:2]) < p_joint] = 0
    for j in (NOSE, NECK, R_SHOULDER, L_SHOULDER):
        clip[rng.random(n_frames) < p_key, j] = 0
    for joints in HANDS:
        hand = list(joints)
        clip[np.ix_(rng.random(n_frames) < p_hand, hand)] = 0
        for t in np.flatnonzero(rng.random(n_frames) < p_hand):
            keep = rng.choice(hand)
            clip[t, [j for j in hand if j != keep]] = 0
            clip[t, keep] = rng.uniform(0.1, 0.9, 2)
    return clip.astype(np.float32)


def special_clips():
    """Clips that hit every rule on purpose, one case per frame (comments say which)."""
    rng = np.random.default_rng(7)
    a = random_clip(rng, 12, p_joint=0.0)
    a[0, [L_SHOULDER, NECK]] = 0                    # no box and none yet: body skipped
    a[2, R_SHOULDER] = 0                            # a shoulder missing: hm = |neck - nose|
    a[3, [L_SHOULDER, NOSE]] = 0                    # previous-box rule (left shoulder and nose missing)
    a[4, [R_SHOULDER, NECK]] = 0                    # again, two in a row: still frame 2's box
    a[5, HANDS[0]] = 0                              # fully missing hand
    a[6, list(HANDS[1])[1:]] = 0                    # a hand with one present joint (its wrist)
    a[7, NECK] = [0.05, 0.5]                        # neck near the left edge: start_x < 0, clamped
    a[8, [3, 5, 7, 9, 11]] = 0                      # missing body joints, left eye included (start_y = hm)
    a[9, list(HANDS[0])[:4]] = 0                    # partly missing hand
    a[10, list(HANDS[1])] = [0.4, 0.3]              # all joints of a hand at one point: w = h = 0
    b = random_clip(rng, 5, p_joint=0.0)
    b[:2, [R_SHOULDER, NOSE]] = 0                   # first two frames: no box yet
    c = random_clip(rng, 7, p_joint=0.1)
    c[2, L_SHOULDER] = c[2, R_SHOULDER]             # shoulders at one point: hm = 0, a zero-size body box
    c[3, [L_SHOULDER, NECK]] = 0                    # ... reused by the next frame
    c[5, list(HANDS[0])[::2]] = [0.6, 0.2]          # coinciding hand joints plus others: a normal box
    d = random_clip(rng, 1, p_joint=0.2)            # a single frame
    e = np.zeros((4, 54, 2), np.float32)            # a clip with nothing detected at all
    return [a, b, c, d, e]


def pad(clips, rng, garbage=True):
    """A padded batch (B, T, 54, 2) and its pad_mask; padding is random garbage (with zeros, NaN, inf) or zeros."""
    B, T = len(clips), max(len(c) for c in clips)
    poses = rng.uniform(-3, 3, (B, T, 54, 2)).astype(np.float32) if garbage else np.zeros((B, T, 54, 2), np.float32)
    if garbage:
        poses[rng.random((B, T, 54)) < 0.2] = 0
        poses[rng.random((B, T, 54, 2)) < 0.02] = np.nan
        poses[rng.random((B, T, 54, 2)) < 0.02] = np.inf
    pad_mask = np.ones((B, T), bool)
    for i, clip in enumerate(clips):
        poses[i, :len(clip)], pad_mask[i, :len(clip)] = clip, False
    return torch.from_numpy(poses), torch.from_numpy(pad_mask)


def assert_real_frames_match(batch, pad_mask, expected_clips):
    for i, expected in enumerate(expected_clips):
        np.testing.assert_allclose(batch[i, :len(expected)].double().numpy(), expected, rtol=0, atol=ATOL)
    assert torch.all(batch[pad_mask] == 0)  # padding frames come out as zeros


# -----------------------------------------------------------------------------
# normalization
# -----------------------------------------------------------------------------


def test_normalize_matches_reference_on_every_special_case():
    clips, stats = special_clips(), Counter()
    expected = [reference_normalize(c, stats) for c in clips]
    poses, pad_mask = pad(clips, np.random.default_rng(0))
    out = st.normalize_poses(poses, pad_mask)
    assert out.shape == poses.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_real_frames_match(out, pad_mask, expected)
    for rule in ('no_box_yet', 'reused_box', 'hm_shoulders', 'hm_neck_nose', 'clamped_start_x', 'clamped_end_y',
                 'zero_size_body_box', 'empty_hand', 'one_joint_hand', 'zero_size_hand_box'):
        assert stats[rule] > 0, f"the special clips no longer hit {rule}"
    # and the rules did what they say: the skipped frame is raw - 0.5, the reused box is frame 2's
    np.testing.assert_allclose(out[0, 0, :12].numpy(), clips[0][0, :12] - 0.5, atol=ATOL)
    assert torch.all(out[4, :4] == -0.5)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_normalize_matches_reference_on_random_clips_with_many_missing_points(seed):
    rng = np.random.default_rng(seed)
    clips = [random_clip(rng, n, p_joint=0.15, p_key=0.35, p_hand=0.15) for n in rng.integers(1, 40, 8)]
    stats = Counter()
    expected = [reference_normalize(c, stats) for c in clips]
    poses, pad_mask = pad(clips, rng)
    assert_real_frames_match(st.normalize_poses(poses, pad_mask), pad_mask, expected)
    assert stats['reused_box'] > 0 and stats['hm_neck_nose'] > 0 and stats['one_joint_hand'] > 0


def test_padding_never_reaches_real_frames():
    """Garbage padding, zero padding, and each clip alone give the same real frames."""
    clips, rng = special_clips(), np.random.default_rng(4)
    garbage, pad_mask = pad(clips, rng)
    zeros, _ = pad(clips, rng, garbage=False)
    with_garbage, with_zeros = st.normalize_poses(garbage, pad_mask), st.normalize_poses(zeros, pad_mask)
    assert torch.equal(with_garbage, with_zeros)
    for i, clip in enumerate(clips):
        alone = st.normalize_poses(torch.from_numpy(clip))  # one clip (T, 54, 2), no mask
        assert torch.equal(alone, with_garbage[i, :len(clip)])


def test_normalize_leaves_its_input_alone_and_checks_the_shape():
    poses, pad_mask = pad(special_clips(), np.random.default_rng(5))
    before = poses.clone()
    st.normalize_poses(poses, pad_mask)
    assert torch.equal(poses.nan_to_num(7.0), before.nan_to_num(7.0))
    with pytest.raises(ValueError, match=r'\(B, T, 54, 2\)'):
        st.normalize_poses(torch.zeros(2, 3, 50, 2))


# -----------------------------------------------------------------------------
# augmentations with given parameters
# -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def raw_batch():
    rng = np.random.default_rng(11)
    clips = [random_clip(rng, 10, p_joint=0.15, p_key=0.1, p_hand=0.1) for _ in range(6)]
    return np.stack(clips), torch.from_numpy(np.stack(clips))


def check_against_reference(out, clips, reference, *per_clip_args):
    for i, clip in enumerate(clips):
        expected = reference(clip, *(a[i] for a in per_clip_args))
        np.testing.assert_allclose(out[i].double().numpy(), expected, rtol=0, atol=ATOL)
    missing = torch.from_numpy(clips[..., 0] == 0)
    assert torch.equal(out[missing], torch.from_numpy(clips)[missing])  # missing points stay exactly as they were


def test_rotate_matches_reference(raw_batch):
    clips, poses = raw_batch
    theta = [-13.0, -5.5, 0.0, 2.0, 9.0, 13.0]
    check_against_reference(st.rotate(poses, torch.tensor(theta)), clips, reference_rotate, theta)


def test_perspective_matches_reference(raw_batch):
    clips, poses = raw_batch
    r, flip = [0.0, 0.03, 0.1, 0.07, 0.05, 0.1], [True, True, False, False, True, False]
    out = st.perspective(poses, torch.tensor(r), torch.tensor(flip))
    check_against_reference(out, clips, reference_perspective, r, flip)
    assert torch.equal(out[:, :, 12:], poses[:, :, 12:])  # hands untouched


def test_squeeze_matches_reference(raw_batch):
    clips, poses = raw_batch
    ml, mr = [0.0, 0.15, 0.1, 0.02, 0.07, 0.15], [0.15, 0.0, 0.1, 0.13, 0.01, 0.15]
    out = st.squeeze(poses, torch.tensor(ml), torch.tensor(mr))
    check_against_reference(out, clips, reference_squeeze, ml, mr)
    assert torch.equal(out[..., 1], poses[..., 1]) and torch.equal(out[:, :, 12:], poses[:, :, 12:])


def test_arm_rotate_matches_reference(raw_batch):
    clips, poses = raw_batch
    angles = np.zeros((6, 2, 3))
    angles[0] = [[4, 0, 0], [0, 0, 0]]         # neck pivot only: shoulder, elbow, wrist of the right arm swing
    angles[1] = [[0, -4, 0], [0, 0, 3]]        # shoulder pivot right, elbow pivot left
    angles[2] = [[3, -2, 4], [-4, 1, -3]]      # every pivot of both arms, chained
    angles[3] = [[0, 0, 0], [2.5, 2.5, 0]]
    angles[4] = [[-1, 0, 2], [0, 0, 0]]
    angles[5] = 0                              # nothing fires: exactly unchanged
    clips[3, 4, R_SHOULDER] = clips[3, 4, L_SHOULDER] = 0  # a missing pivot and a missing rotated joint
    poses = torch.from_numpy(clips)
    out = st.arm_rotate(poses, torch.from_numpy(angles).float())
    check_against_reference(out, clips, reference_arm_rotate, angles.astype(np.float32).astype(np.float64))
    others = [j for j in range(54) if j not in (6, 7, 8, 9, 10, 11)]
    assert torch.equal(out[:, :, others], poses[:, :, others]) and torch.equal(out[5], poses[5])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_homography_maps_the_source_corners_to_the_destination_corners(dtype):
    r = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.1, 0.037], dtype=dtype)
    flip = torch.tensor([True, False, True, False, True, False])
    dst = st.perspective_corners(r, flip)
    src = torch.tensor(st.UNIT_SQUARE, dtype=dtype).expand_as(dst)
    H = st.homography(src, dst)
    assert torch.allclose(st.apply_homography(src, H), dst, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.allclose(H[0], torch.eye(3, dtype=dtype), atol=1e-6)  # r = 0: identity
    for i in range(len(r)):  # the same system solved independently
        expected = reference_homography(st.UNIT_SQUARE, reference_corners(r[i].item(), flip[i].item()))
        np.testing.assert_allclose(H[i].double().numpy(), expected, atol=1e-6)


# -----------------------------------------------------------------------------
# augment_poses: random choice per clip
# -----------------------------------------------------------------------------

REFERENCES = (lambda c, p: reference_rotate(c, p['theta']),
              lambda c, p: reference_perspective(c, p['r'], p['flip']),
              lambda c, p: reference_squeeze(c, p['ml'], p['mr']),
              lambda c, p: reference_arm_rotate(c, p['arm_angles']))


def test_augment_poses_applies_the_drawn_augmentation_to_each_clip():
    rng = np.random.default_rng(12)
    clips = np.stack([random_clip(rng, 6, p_joint=0.1) for _ in range(40)])
    poses = torch.from_numpy(clips)
    params = st.sample_augmentation_params(len(clips), torch.Generator().manual_seed(3))
    out = st.augment_poses(poses, generator=torch.Generator().manual_seed(3))
    for i, clip in enumerate(clips):
        p = {k: v[i].tolist() for k, v in params.items()}
        expected = clip if p['kind'] == -1 else REFERENCES[p['kind']](clip, p)
        np.testing.assert_allclose(out[i].double().numpy(), expected, rtol=0, atol=ATOL)
    assert set(params['kind'].tolist()) == {-1, 0, 1, 2, 3}


def test_sampled_parameters_follow_the_spec_distributions():
    p = st.sample_augmentation_params(20_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(p['kind'] + 1, minlength=5).double() / 20_000
    assert abs(counts[0] - 0.5) < 0.02 and torch.all((counts[1:] - 0.125).abs() < 0.015)
    for name, low, high in (('theta', -13, 13), ('r', 0, 0.1), ('ml', 0, 0.15), ('mr', 0, 0.15)):
        assert p[name].min() >= low and p[name].max() <= high
        assert p[name].min() < low + 0.01 * (high - low) and p[name].max() > high - 0.01 * (high - low)
    assert abs(p['flip'].double().mean() - 0.5) < 0.02
    fired = p['arm_angles'] != 0
    assert p['arm_angles'].shape == (20_000, 2, 3) and abs(fired.double().mean() - 0.3) < 0.01
    assert p['arm_angles'].abs().max() <= 4 and p['arm_angles'].abs().max() > 3.9


def kind_from_changes(before, after):
    """Which augmentation changed a clip, read from which coordinates moved (-1: none)."""
    moved = (before != after)  # (T, 54, 2)
    if not moved.any():
        return -1
    if moved[:, 12:].any():
        return 0  # only rotate moves the hands
    if moved[:, :6].any():
        return 1 if moved[:, :12, 1].any() else 2  # perspective moves head joints in y too, squeeze in x only
    return 3  # only shoulders, elbows, wrists moved


def test_augment_poses_changes_about_half_the_clips_and_uses_all_four_kinds():
    rng = np.random.default_rng(13)
    poses = torch.from_numpy(np.stack([random_clip(rng, 4, p_joint=0.0) for _ in range(400)]))
    out = st.augment_poses(poses, generator=torch.Generator().manual_seed(21))
    kinds = [kind_from_changes(poses[i], out[i]) for i in range(400)]
    changed = sum(k != -1 for k in kinds) / 400
    assert 0.35 <= changed <= 0.65
    counts = Counter(kinds)
    assert all(counts[k] >= 20 for k in range(4)), counts
    drawn = st.sample_augmentation_params(400, torch.Generator().manual_seed(21))
    fired = (drawn['arm_angles'] != 0).flatten(1).any(1).tolist()
    # the kinds read from the changes are the kinds drawn (an arm rotate where no pivot fired changes nothing)
    assert kinds == [-1 if k == 3 and not f else k for k, f in zip(drawn['kind'].tolist(), fired)]


def test_augment_poses_is_reproducible_keeps_missing_points_and_ignores_padding():
    rng = np.random.default_rng(14)
    clips = [random_clip(rng, n, p_joint=0.3, p_key=0.2, p_hand=0.2) for n in rng.integers(1, 20, 64)]
    garbage, pad_mask = pad(clips, rng)
    zeros, _ = pad(clips, rng, garbage=False)
    first = st.augment_poses(garbage, pad_mask, torch.Generator().manual_seed(5))
    again = st.augment_poses(garbage, pad_mask, torch.Generator().manual_seed(5))
    other = st.augment_poses(garbage, pad_mask, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(first, st.augment_poses(zeros, pad_mask, torch.Generator().manual_seed(5)))
    assert torch.all(first[pad_mask] == 0) and torch.isfinite(first).all()
    missing = (zeros[..., 0] == 0) & ~pad_mask[..., None]
    assert missing.sum() > 1000 and torch.all(first[missing] == 0)
    assert torch.all(first[~pad_mask][..., 0][zeros[~pad_mask][..., 0] != 0] != 0)  # present points stay present


def test_augment_then_normalize_on_a_training_batch_is_finite():
    rng = np.random.default_rng(15)
    clips = [random_clip(rng, n, p_joint=0.1, p_key=0.1, p_hand=0.1) for n in rng.integers(5, 30, 16)]
    poses, pad_mask = pad(clips, rng)
    out = st.normalize_poses(st.augment_poses(poses, pad_mask, torch.Generator().manual_seed(0)), pad_mask)
    assert torch.isfinite(out).all() and torch.all(out[pad_mask] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    rng = np.random.default_rng(16)
    clips = [random_clip(rng, n, p_joint=0.15, p_key=0.3, p_hand=0.15) for n in rng.integers(1, 30, 16)]
    poses, pad_mask = pad(clips, rng)
    for fn in (lambda p, m: st.normalize_poses(p, m),
               lambda p, m: st.augment_poses(p, m, torch.Generator().manual_seed(1))):
        cpu, gpu = fn(poses, pad_mask), fn(poses.cuda(), pad_mask.cuda())
        assert gpu.device.type == 'cuda' and torch.allclose(gpu.cpu(), cpu, atol=1e-5)
