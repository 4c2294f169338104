"""data.py's pose family: the SPOTER landmark order, the CSV reader/writer, label bases, the HDF5 cache, and the
procedural signs (deterministic, in range, with missing data, and learnable)."""
import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch

import data
from common import UserError
from data import (SPOTER_LANDMARKS, load_pose_cache, make_sign_clips, pose_cache, read_spoter_csv,
                  resolve_label_offset, write_sign_csvs, write_spoter_csv)


@pytest.fixture(scope='module')
def signs():
    """A small procedural set: 4 classes x 3 clips of 5-12 frames."""
    return make_sign_clips(4, 3, seed=7, min_frames=5, max_frames=12)


@pytest.fixture
def sign_csv(tmp_path, signs):
    path = tmp_path / 'signs.csv'
    write_spoter_csv(path, *signs)
    return path


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def write_rows(path, rows):
    with open(path, 'w', newline='') as f:
        csv.writer(f, lineterminator='\n').writerows(rows)
    return path


def set_cell(path, row, column, value):
    """Replace one cell (row 1 = the first data row) of a CSV."""
    rows = read_rows(path)
    rows[row][rows[0].index(column)] = value
    write_rows(path, rows)


def drop_column(src, dst, column):
    """Copy a CSV without one column."""
    rows = read_rows(src)
    index = rows[0].index(column)
    return write_rows(dst, [r[:index] + r[index + 1:] for r in rows])


# -----------------------------------------------------------------------------
# landmark order
# -----------------------------------------------------------------------------

def test_landmark_order_follows_the_spec():
    assert len(SPOTER_LANDMARKS) == 54 and len(set(SPOTER_LANDMARKS)) == 54
    expected = {0: 'nose', 1: 'neck', 6: 'rightShoulder', 7: 'leftShoulder', 10: 'rightWrist', 11: 'leftWrist',
                12: 'wrist_left', 13: 'indexTip_left', 16: 'indexMCP_left', 29: 'thumbTip_left',
                32: 'thumbCMC_left', 33: 'wrist_right', 34: 'indexTip_right', 53: 'thumbCMC_right'}
    assert {i: SPOTER_LANDMARKS[i] for i in expected} == expected
    assert data.SPOTER_COLUMNS[:3] == ['nose_X', 'nose_Y', 'neck_X'] and data.SPOTER_COLUMNS[-1] == 'thumbCMC_right_Y'


# -----------------------------------------------------------------------------
# SPOTER CSV: round trip, extra columns, skipped rows
# -----------------------------------------------------------------------------

def test_csv_round_trip_is_exact(sign_csv, signs):
    clips, labels = signs
    got, got_labels, skipped = read_spoter_csv(sign_csv)
    assert skipped == 0 and got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()
    assert len(got) == len(clips)
    for a, b in zip(got, clips):
        assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)
    header = sign_csv.read_text().splitlines()[0].split(',')
    assert header[:3] == ['labels', 'nose_X', 'nose_Y']


def test_reader_takes_xy_from_the_named_columns_and_ignores_extra_columns(tmp_path):
    """Columns in another order, with root_X/video_fps extras, still land at their landmark's index."""
    clip = np.zeros((2, 54, 2), dtype=np.float32)
    clip[:, 11] = [[0.25, 0.75], [0.5, 0.125]]  # leftWrist
    clip[:, 33] = [[0.375, 0.625], [0.0, 0.0]]  # wrist_right, missing in frame 2
    columns = ['video_fps', 'root_X'] + data.SPOTER_COLUMNS[::-1] + ['labels', 'video_size_width']
    cells = {f'{s}_{a}': str(clip[:, i, j].tolist())
             for i, s in enumerate(SPOTER_LANDMARKS) for j, a in enumerate('XY')}
    row = [cells.get(c, '') for c in columns]
    row[0], row[1], row[-2], row[-1] = '25', '[0.1, 0.2]', '3', '640'
    path = tmp_path / 'extra.csv'
    path.write_text(','.join(columns) + '\n' + ','.join(f'"{v}"' for v in row) + '\n')
    clips, labels, skipped = read_spoter_csv(path)
    assert labels.tolist() == [3] and skipped == 0
    assert np.array_equal(clips[0], clip)


def test_all_missing_rows_are_skipped_and_counted(tmp_path, signs):
    clips, labels = signs
    empty = np.zeros((9, 54, 2), dtype=np.float32)
    path = tmp_path / 'missing.csv'
    write_spoter_csv(path, [clips[0], empty, clips[1], empty], [5, 6, 7, 8])
    got, got_labels, skipped = read_spoter_csv(path)
    assert skipped == 2 and got_labels.tolist() == [5, 7]
    assert np.array_equal(got[1], clips[1])
    write_spoter_csv(path, [empty], [0])
    with pytest.raises(UserError, match='no landmark in any frame'):
        read_spoter_csv(path)


def test_python_literals_json_cannot_read_are_parsed_exactly(sign_csv):
    n = len(read_spoter_csv(sign_csv)[0][0])
    set_cell(sign_csv, 1, 'nose_X', '[.5' + ', 1.' * (n - 1) + ']')  # valid Python, invalid JSON
    clip = read_spoter_csv(sign_csv)[0][0]
    assert clip[0, 0, 0] == 0.5 and (clip[1:, 0, 0] == 1.0).all()


# -----------------------------------------------------------------------------
# label base
# -----------------------------------------------------------------------------

def test_label_offset_auto_and_explicit():
    one_based, zero_based = np.array([1, 3, 2, 1]), np.array([0, 2, 1, 0])
    shifted, offset = resolve_label_offset(one_based, 'auto', 3, 'x.csv')
    assert offset == 1 and shifted.tolist() == [0, 2, 1, 0]
    shifted, offset = resolve_label_offset(zero_based, 'auto', 3, 'x.csv')
    assert offset == 0 and shifted.tolist() == [0, 2, 1, 0]
    shifted, offset = resolve_label_offset(np.array([5, 7]), 5, None, 'x.csv')
    assert offset == 5 and shifted.tolist() == [0, 2]
    with pytest.raises(UserError, match=r"x\.csv.*smallest label is 2"):
        resolve_label_offset(np.array([2, 3, 4]), 'auto', 10, 'x.csv')


def test_label_out_of_range_names_the_value_and_range():
    with pytest.raises(UserError, match=r"x\.csv: label 100 .*0\.\.99"):
        resolve_label_offset(np.array([0, 5, 100]), 'auto', 100, 'x.csv')
    with pytest.raises(UserError, match=r"label 0 .*is -1"):  # offset 1 on 0-based labels
        resolve_label_offset(np.array([0, 5]), 1, None, 'x.csv')
    with pytest.raises(UserError, match='label_offset'):
        resolve_label_offset(np.array([0]), 'one', 5, 'x.csv')


# -----------------------------------------------------------------------------
# bad input: one line naming the file, row and column
# -----------------------------------------------------------------------------

def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match=r'nothere\.csv: no such file'):
        read_spoter_csv(tmp_path / 'nothere.csv')
    with pytest.raises(UserError, match=r'nothere\.csv: no such file'):
        pose_cache(tmp_path / 'nothere.csv', tmp_path / 'cache')
    (tmp_path / 'empty.csv').write_text('')
    with pytest.raises(UserError, match=r'empty\.csv is empty'):
        read_spoter_csv(tmp_path / 'empty.csv')
    (tmp_path / 'header.csv').write_text(','.join(['labels'] + data.SPOTER_COLUMNS) + '\n')
    with pytest.raises(UserError, match=r'header\.csv has a header but no data rows'):
        read_spoter_csv(tmp_path / 'header.csv')
    (tmp_path / 'binary.csv').write_bytes(b'labels,nose_X\n\xff\xfe\x00\x81\n')
    with pytest.raises(UserError, match=r'binary\.csv: row \d+: not a readable UTF-8 CSV'):
        read_spoter_csv(tmp_path / 'binary.csv')


def test_missing_columns_are_named(tmp_path, sign_csv):
    path = drop_column(sign_csv, tmp_path / 'no_hand.csv', 'middlePIP_right_Y')
    with pytest.raises(UserError, match=r"no_hand\.csv: row 0.*'middlePIP_right_Y' is missing.*hand 1"):
        read_spoter_csv(path)
    path = drop_column(sign_csv, tmp_path / 'no_body.csv', 'leftElbow_X')
    with pytest.raises(UserError, match=r"no_body\.csv: .*'leftElbow_X' is missing.*body landmarks"):
        read_spoter_csv(path)
    path = drop_column(sign_csv, tmp_path / 'no_labels.csv', 'labels')
    with pytest.raises(UserError, match=r"no_labels\.csv: .*no 'labels' column"):
        read_spoter_csv(path)


# each bad cell keeps its row's frame count n (except the one that is about the count), so it fails for its content
@pytest.mark.parametrize('column,make_value,message', [
    ('rightEar_Y', lambda n: 'not a list', r"row 2, column rightEar_Y: expected a list of numbers"),
    ('indexTip_left_X', lambda n: str(['0.5'] * n), r"row 2, column indexTip_left_X: expected a list of numbers"),
    ('indexTip_left_X', lambda n: str([[0.5]] * n), r"row 2, column indexTip_left_X: expected a list of numbers"),
    ('indexTip_left_X', lambda n: str([True] * n), r"row 2, column indexTip_left_X: expected a list of numbers"),
    ('indexTip_left_X', lambda n: str(tuple([0.5] * n)), r"row 2, column indexTip_left_X: expected a list of numbers"),
    ('thumbIP_right_X', lambda n: '[NaN' + ', 0.5' * (n - 1) + ']', r"row 2, column thumbIP_right_X: contains a NaN"),
    ('neck_Y', lambda n: str([0.5] * (n + 1)), r"row 2: column neck_Y has \d+ frames but column nose_X has \d+"),
    ('labels', lambda n: 'sign7', r"row 2, column labels: 'sign7' is not an integer"),
    ('labels', lambda n: '2.5', r"row 2, column labels: '2.5' is not an integer"),
])
def test_bad_cells_name_file_row_and_column(sign_csv, column, make_value, message):
    n = len(read_spoter_csv(sign_csv)[0][1])  # frames of data row 2
    set_cell(sign_csv, 2, column, make_value(n))
    with pytest.raises(UserError, match=r'signs\.csv: ' + message):
        read_spoter_csv(sign_csv)


def test_ragged_row_is_an_error(sign_csv):
    rows = read_rows(sign_csv)
    write_rows(sign_csv, rows[:2] + [rows[2][:-1]])
    with pytest.raises(UserError, match=r'signs\.csv: row 2 has 108 fields but the header has 109'):
        read_spoter_csv(sign_csv)


def test_integral_float_labels_are_accepted(sign_csv):
    set_cell(sign_csv, 1, 'labels', '3.0')
    assert read_spoter_csv(sign_csv)[1][0] == 3


# -----------------------------------------------------------------------------
# HDF5 cache
# -----------------------------------------------------------------------------

def test_pose_cache_writes_reuses_and_rebuilds(tmp_path, sign_csv, signs):
    clips, labels = signs
    cache = tmp_path / 'cache'
    h5_path = pose_cache(sign_csv, cache)
    assert os.path.dirname(h5_path) == str(cache / 'spoter') and os.path.basename(h5_path).endswith('.h5')
    frames, offsets, got_labels, skipped = load_pose_cache(h5_path)
    assert frames.dtype == np.float32 and offsets.dtype == np.int64 and got_labels.dtype == np.int64
    assert offsets.tolist() == np.cumsum([0] + [len(c) for c in clips]).tolist() and skipped == 0
    assert np.array_equal(frames, np.concatenate(clips)) and got_labels.tolist() == labels.tolist()
    with h5py.File(h5_path, 'r') as f:
        assert f.attrs['complete'] and f.attrs['source'] == os.path.abspath(sign_csv) and len(f.attrs['sha256']) == 64
    assert os.listdir(cache / 'spoter') == [os.path.basename(h5_path)]  # no temporary file left behind

    mtime = os.stat(h5_path).st_mtime_ns
    assert pose_cache(sign_csv, cache) == h5_path and os.stat(h5_path).st_mtime_ns == mtime  # reused

    size = os.path.getsize(h5_path)
    for damage in (lambda f: f.truncate(size // 2), lambda f: f.write(b'not an hdf5 file at all')):
        with open(h5_path, 'r+b') as f:
            damage(f)
        with pytest.raises(UserError, match='pose cache .* is not usable'):
            load_pose_cache(h5_path)
        assert pose_cache(sign_csv, cache) == h5_path  # rebuilt, not a crash
        assert np.array_equal(load_pose_cache(h5_path)[0], np.concatenate(clips))

    with h5py.File(h5_path, 'r+') as f:  # interrupted before the last attribute
        del f.attrs['complete']
    mtime = os.stat(h5_path).st_mtime_ns
    assert pose_cache(sign_csv, cache) == h5_path and os.stat(h5_path).st_mtime_ns != mtime
    assert load_pose_cache(h5_path)[2].tolist() == labels.tolist()

    with h5py.File(h5_path, 'r+') as f:  # complete and from this CSV, but its offsets overrun its frames
        f['offsets'][-1] = f['offsets'][-1] + 1
    assert pose_cache(sign_csv, cache) == h5_path and load_pose_cache(h5_path)[1][-1] == sum(len(c) for c in clips)

    write_spoter_csv(sign_csv, clips[:5], labels[:5])  # an edited CSV: a new key, the old cache left alone
    new_path = pose_cache(sign_csv, cache)
    assert new_path != h5_path and load_pose_cache(new_path)[2].tolist() == labels[:5].tolist()


def test_pose_cache_records_skipped_rows_and_writes_nothing_on_bad_input(tmp_path, signs):
    clips, labels = signs
    path = tmp_path / 'skip.csv'
    write_spoter_csv(path, [clips[0], np.zeros((4, 54, 2), np.float32)], [0, 1])
    assert load_pose_cache(pose_cache(path, tmp_path / 'cache'))[3] == 1
    set_cell(path, 1, 'labels', 'x')
    with pytest.raises(UserError, match='row 1, column labels'):
        pose_cache(path, tmp_path / 'cache')
    assert len(os.listdir(tmp_path / 'cache' / 'spoter')) == 1


# -----------------------------------------------------------------------------
# procedural signs
# -----------------------------------------------------------------------------

def test_generator_is_deterministic_in_range_and_has_missing_data():
    clips, labels = make_sign_clips(5, 6, seed=3, min_frames=8, max_frames=20)
    again, again_labels = make_sign_clips(5, 6, seed=3, min_frames=8, max_frames=20)
    other, _ = make_sign_clips(5, 6, seed=4, min_frames=8, max_frames=20)
    assert all(np.array_equal(a, b) for a, b in zip(clips, again)) and np.array_equal(labels, again_labels)
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(clips, other))
    assert labels.tolist() == [c for c in range(5) for _ in range(6)]
    assert all(c.dtype == np.float32 and c.shape[1:] == (54, 2) and 8 <= len(c) <= 20 for c in clips)
    values = np.concatenate(clips)
    assert values.min() >= 0 and values.max() <= 1
    present = values[values != 0]
    assert present.min() > 0 and 0 < (values == 0).mean() < 0.1  # missing is exactly 0, and not too common
    many = np.concatenate(make_sign_clips(200, 1, seed=0, min_frames=20, max_frames=20)[0])  # every class's extremes
    assert many.min() >= 0 and many.max() <= 1
    hand_gaps = sum((c[:, 12:33] == 0).all(axis=(1, 2)).any() or (c[:, 33:] == 0).all(axis=(1, 2)).any() for c in clips)
    assert hand_gaps > 0  # whole hands go missing for a few frames


def test_generator_skeleton_is_plausible():
    clip = np.concatenate(make_sign_clips(3, 4, seed=0)[0])
    def mean(name):  # over the frames where the landmark is present
        track = clip[:, SPOTER_LANDMARKS.index(name)]
        return track[(track != 0).all(1)].mean(0)
    assert np.allclose(mean('nose'), [0.5, 0.8], atol=0.05)
    assert mean('rightShoulder')[0] < mean('neck')[0] < mean('leftShoulder')[0]
    assert mean('nose')[1] > mean('neck')[1] > mean('rightElbow')[1] and mean('nose')[1] > mean('leftWrist')[1]
    # the hand's wrist joint follows the body's wrist (hand 0 = `_left` = leftWrist), fingers within a hand's reach
    ok = (clip[:, 12] != 0).all(1)
    assert np.abs(clip[ok, 12] - clip[ok, 11]).max() < 0.02
    assert np.abs(clip[ok, 12:33] - clip[ok, 12:13]).max() < 0.15


def wrist_features(clips):
    """Per clip: mean and spread over frames of both wrists, relative to the neck (framing shifts cancel)."""
    wrists = [c[:, [10, 11]] - c[:, [1]] for c in clips]
    return np.array([np.concatenate([w.mean(0).ravel(), w.std(0).ravel()]) for w in wrists])


def nearest_mean_accuracy(train, train_labels, test, test_labels, num_classes):
    means = np.stack([train[train_labels == c].mean(0) for c in range(num_classes)])
    predicted = ((test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    return (predicted == test_labels).mean()


def test_signs_are_learnable_by_a_nearest_class_mean():
    """Ground truth check: held-out clips (another seed) sit nearest their own class's mean wrist features."""
    num_classes = 10
    train, train_labels = make_sign_clips(num_classes, 12, seed=0)
    test, test_labels = make_sign_clips(num_classes, 8, seed=1)
    train, test = wrist_features(train), wrist_features(test)
    accuracy = nearest_mean_accuracy(train, train_labels, test, test_labels, num_classes)
    assert accuracy > 2 / num_classes
    # the class carries the signal: with shuffled training labels the same classifier does worse
    shuffled = np.random.default_rng(0).permutation(train_labels)
    assert nearest_mean_accuracy(train, shuffled, test, test_labels, num_classes) < accuracy


def test_write_sign_csvs_reuses_its_files(tmp_path):
    folder = tmp_path / 'signs'
    paths = write_sign_csvs(folder, num_classes=3, clips_per_class=(4, 2, 2), seed=1)
    assert [os.path.basename(p) for p in paths] == ['train.csv', 'val.csv', 'test.csv']
    splits = [read_spoter_csv(p) for p in paths]
    assert [len(s[0]) for s in splits] == [12, 6, 6] and sorted(set(splits[0][1].tolist())) == [0, 1, 2]
    assert not np.array_equal(splits[1][0][0][:5], splits[2][0][0][:5])  # disjoint seeds per split
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    assert write_sign_csvs(folder, num_classes=3, clips_per_class=(4, 2, 2), seed=1) == paths
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes  # reused
    with open(paths[1], 'a') as f:  # an edited file no longer matches meta.json: written again
        f.write('tampered\n')
    write_sign_csvs(folder, num_classes=3, clips_per_class=(4, 2, 2), seed=1)
    assert len(read_spoter_csv(paths[1])[0]) == 6
    assert json.loads((folder / 'meta.json').read_text())['recipe']['seed'] == 1
    write_sign_csvs(folder, num_classes=3, clips_per_class=(4, 2, 2), seed=2)  # another recipe: rewritten
    assert not np.array_equal(read_spoter_csv(paths[0])[0][0][:5], splits[0][0][0][:5])


def test_gather_clips_equals_pad_clips_bit_for_bit():
    """train_spoter.py builds batches with gather_clips (on the training device) from the pose cache's arrays."""
    rng = np.random.default_rng(0)
    clips = [rng.random((n, 54, 2), dtype=np.float32) for n in (5, 1, 9, 3, 9)]
    frames = torch.from_numpy(np.concatenate(clips))
    offsets = np.cumsum([0] + [len(c) for c in clips])
    for indices in ([0], [1, 3], [4, 0, 2, 1], np.array([2, 2, 4])):
        expected, expected_mask = data.pad_clips(clips, indices)
        poses, pad_mask = data.gather_clips(frames, offsets, indices)
        assert torch.equal(poses, expected) and torch.equal(pad_mask, expected_mask)
        assert poses.shape == (len(indices), max(len(clips[i]) for i in indices), 54, 2)
