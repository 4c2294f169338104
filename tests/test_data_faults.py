"""data.py under faults: no data file runs code (pickle payloads in every npz/HDF5 reader), every cache verifies its
inputs and its own bytes before reuse (same-size edits and garbage are rebuilt, with one log line), non-finite audio
is skipped and named, and bad inputs are one UserError that changes no file (a {path: bytes} snapshot)."""
import builtins
import csv
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_script

import data
from common import UserError
from data import (AUDIO_FEATURES, load_pose_cache, load_vae_data, make_sign_clips, make_sprites, pose_cache,
                  prepare_audio_cache, prepare_text, resolve_label_offset, write_sleep_sounds, write_spoter_csv,
                  write_wav)

LABELS = {'quiet': 0, 'breathe': 1, 'snore': 2}
SHORT = dict(AUDIO_FEATURES, clip_seconds=0.5)  # 51 frames: quick caches


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


class Payload:
    """Unpickling this runs `call` (os.system, builtins.exec, builtins.open): each one creates the marker file."""

    def __init__(self, call, marker):
        self.call, self.marker = call, str(marker)

    def __reduce__(self):
        args = {os.system: (f'touch {self.marker}',), builtins.exec: (f"open({self.marker!r}, 'w')",),
                builtins.open: (self.marker, 'w')}[self.call]
        return self.call, args


CALLS = [os.system, builtins.exec, builtins.open]


def object_array(payload):
    array = np.empty(3, dtype=object)
    array[:] = [payload, 1.0, 'x']
    return array


def test_the_payloads_are_live(tmp_path):
    """The control: plain pickle runs each payload (so the refusals below are refusals, not duds)."""
    for i, call in enumerate(CALLS):
        pickle.loads(pickle.dumps(Payload(call, tmp_path / f'ran{i}')))
        assert (tmp_path / f'ran{i}').exists()


# -----------------------------------------------------------------------------
# 1. no data file can run code
# -----------------------------------------------------------------------------

@pytest.mark.parametrize('call', CALLS)
@pytest.mark.parametrize('nested', [False, True])
def test_a_payload_in_dsprites_metadata_is_refused_naming_the_global(tmp_path, call, nested):
    marker = tmp_path / 'ran'
    imgs, classes = make_sprites(8, seed=0)
    metadata = dict(latents_names=('color', 'shape'), extra=[Payload(call, marker)]) if nested else \
        Payload(call, marker)
    np.savez(tmp_path / 'd.npz', imgs=imgs, latents_classes=classes, metadata=np.array(metadata, dtype=object))
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        load_vae_data(str(tmp_path / 'd.npz'))
    message = str(e.value)
    assert f"data {tmp_path / 'd.npz'}: array 'metadata' is a pickle that would load " in message
    assert call.__name__ in message and 'no data file may run code' in message and '\n' not in message
    assert not marker.exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize('key', ['imgs', 'latents_classes', 'grids', 'factors'])
def test_object_arrays_in_vae_files_are_refused(tmp_path, key):
    marker = tmp_path / 'ran'
    arrays = {'grids' if key in ('grids', 'factors') else 'imgs': np.zeros((3, 4, 4), np.uint8)}
    arrays[key] = object_array(Payload(os.system, marker))
    np.savez(tmp_path / 'g.npz', **arrays)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=rf"array '{key}' holds Python objects \(a pickle\), which are never loaded"):
        load_vae_data(str(tmp_path / 'g.npz'))
    assert not marker.exists() and snapshot(tmp_path) == before


@pytest.fixture
def audio_cache(tmp_path):
    """A built audio cache (its own source) in tmp_path/cache: every refusal below must leave it as it is."""
    waves = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 800)).astype(np.float32)
    np.savez(tmp_path / 'good.npz', waveforms=waves, labels=np.array(['quiet', 'snore'] * 2),
             split=np.array(['train'] * 4))
    prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, data=str(tmp_path / 'good.npz'), splits=('train',),
                        log=lambda *a: None)
    return tmp_path / 'cache'


@pytest.mark.parametrize('key', ['waveforms', 'labels', 'lengths', 'split', 'sample_rate'])
def test_object_arrays_in_waveform_files_are_refused(tmp_path, audio_cache, key):
    marker = tmp_path / 'ran'
    arrays = dict(waveforms=np.zeros((3, 800), np.float32), labels=np.array(['quiet'] * 3))
    arrays[key] = object_array(Payload(builtins.exec, marker))
    np.savez(tmp_path / 'w.npz', **arrays)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=rf"waveform file .*w\.npz: array '{key}' holds Python objects"):
        prepare_audio_cache(str(audio_cache), SHORT, LABELS, data=str(tmp_path / 'w.npz'), splits=('train',))
    assert not marker.exists() and snapshot(tmp_path) == before


def pickled_bytes(marker):
    return np.void(pickle.dumps(Payload(os.system, marker)))  # opaque bytes: what HDF5 can hold of a pickle


def test_hdf5_inputs_hold_no_code(tmp_path, audio_cache):
    """HDF5 has no pickles: pickle bytes stored in a dataset are bytes, refused for their dtype, never loaded."""
    marker = tmp_path / 'ran'
    with h5py.File(tmp_path / 'g.h5', 'w') as f:
        f['grids'] = pickled_bytes(marker)
        f.attrs['metadata'] = pickled_bytes(marker)
    with h5py.File(tmp_path / 'w.h5', 'w') as f:
        f['waveforms'], f['labels'] = np.stack([pickled_bytes(marker)] * 2), np.array([b'quiet'] * 2)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"g\.h5: the grid array has shape \(\)"):
        load_vae_data(str(tmp_path / 'g.h5'))
    with pytest.raises(UserError, match=r"w\.h5: 'waveforms' has dtype \|V\d+; expected float samples"):
        prepare_audio_cache(str(audio_cache), SHORT, LABELS, data=str(tmp_path / 'w.h5'), splits=('train',))
    assert not marker.exists() and snapshot(tmp_path) == before


def test_pickle_bytes_planted_in_our_hdf5_caches_are_never_loaded(tmp_path, audio_cache):
    """Pose and audio caches with a pickle planted in an attribute and a dataset: rebuilt (their checks fail), and
    nothing runs."""
    marker, messages = tmp_path / 'ran', []
    clips, labels = make_sign_clips(3, 2, seed=0, min_frames=5, max_frames=8)
    write_spoter_csv(tmp_path / 's.csv', clips, labels)
    h5_pose = pose_cache(str(tmp_path / 's.csv'), str(tmp_path / 'cache'))
    [h5_audio] = audio_cache.rglob('train.h5')
    for h5_path in (h5_pose, h5_audio):
        with h5py.File(h5_path, 'r+') as f:
            f.attrs['checksum'] = f.attrs['labels_sha256'] = pickled_bytes(marker)
            del f['labels']
            f['labels'] = np.stack([pickled_bytes(marker)] * 2)
    assert load_pose_cache(pose_cache(str(tmp_path / 's.csv'), str(tmp_path / 'cache'), log=messages.append))[0].size
    prepare_audio_cache(str(audio_cache), SHORT, LABELS, data=str(tmp_path / 'good.npz'), splits=('train',),
                        log=messages.append)
    assert 'rebuilt' in messages[0] and 'building' in messages[1] and not marker.exists()


# -----------------------------------------------------------------------------
# 2a. caches know their inputs: an edit at the same size is seen
# -----------------------------------------------------------------------------

def rewrite_same_size(path, change):
    """Rewrite a file in place with changed bytes of the same length, its mtime one second later (coarse clocks)."""
    old, stat = path.read_bytes(), path.stat()
    new = change(old)
    assert len(new) == len(old) and new != old
    path.write_bytes(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_a_wav_rewritten_at_the_same_size_is_read_again(tmp_path):
    manifest = write_sleep_sounds(str(tmp_path / 'sounds'), n_clips=20, seed=0)
    messages = []
    paths, _ = prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, manifest=manifest, splits=('train',))
    with open(manifest) as f:
        first = next(r for r in csv.DictReader(f) if r['split'] == 'train')['path']
    wav = tmp_path / 'sounds' / first
    with h5py.File(paths['train'], 'r') as f:
        features = f['features'][0]
    rewrite_same_size(wav, lambda b: b[:44] + bytes(len(b) - 44))  # the same header, silence
    prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, manifest=manifest, splits=('train',),
                        log=messages.append)
    assert 'dataset_hash differs' in messages[0]
    with h5py.File(paths['train'], 'r') as f:
        assert not np.array_equal(f['features'][0], features) and (f['features'][0] == 0).all()


def test_csv_and_text_rewritten_at_the_same_size_are_read_again(tmp_path):
    clips, labels = make_sign_clips(3, 2, seed=0, min_frames=5, max_frames=8)
    write_spoter_csv(tmp_path / 's.csv', clips, labels)
    first = pose_cache(str(tmp_path / 's.csv'), str(tmp_path / 'cache'))
    rewrite_same_size(tmp_path / 's.csv', lambda b: b.replace(b'\n0,', b'\n2,', 1))  # the first label 0 -> 2
    second = pose_cache(str(tmp_path / 's.csv'), str(tmp_path / 'cache'))
    assert second != first and load_pose_cache(second)[2][0] == 2
    (tmp_path / 't.txt').write_text('abc\n' * 100)
    folder, _ = prepare_text(str(tmp_path / 't.txt'), str(tmp_path / 'cache'))
    rewrite_same_size(tmp_path / 't.txt', lambda b: b.replace(b'abc', b'abd', 1))
    assert prepare_text(str(tmp_path / 't.txt'), str(tmp_path / 'cache'))[0] != folder


# -----------------------------------------------------------------------------
# 2b. a cache's own files carry checksums: same-size garbage is rebuilt with one log line, never used
# -----------------------------------------------------------------------------

def overwrite(path, offset, n):
    """n bytes of garbage at offset, the size unchanged."""
    with open(path, 'r+b') as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes((b + 1) % 256 for b in old))


def test_garbage_in_the_token_cache_is_prepared_again(tmp_path):
    (tmp_path / 't.txt').write_text('hello world\n' * 300)
    folder, meta = prepare_text(str(tmp_path / 't.txt'), str(tmp_path / 'cache'))
    good = snapshot(folder)
    for name in ('train.bin', 'val.bin'):
        overwrite(Path(folder) / name, 10, 5)
        messages = []
        assert prepare_text(str(tmp_path / 't.txt'), str(tmp_path / 'cache'), log=messages.append)[1] == meta
        assert messages == [f"token cache {folder}: prepared again: {name} fails its sha256 check (it changed after "
                            f"it was written)"]
        assert snapshot(folder) == good


def data_offset(h5_path, name, clip=None):
    """Where dataset `name`'s bytes (or the chunk of sample `clip`) start in the file."""
    with h5py.File(h5_path, 'r') as f:
        ds = f[name]
        return ds.id.get_offset() if clip is None else ds.id.get_chunk_info_by_coord((clip, 0, 0)).byte_offset


def test_garbage_in_the_pose_cache_is_rebuilt(tmp_path):
    clips, labels = make_sign_clips(3, 2, seed=0, min_frames=5, max_frames=8)
    write_spoter_csv(tmp_path / 's.csv', clips, labels)
    h5_path = pose_cache(str(tmp_path / 's.csv'), str(tmp_path / 'cache'))
    good = Path(h5_path).read_bytes()  # rebuilt below byte for byte: HDF5 files here carry no timestamps
    for name in ('frames', 'labels', 'offsets'):
        overwrite(h5_path, data_offset(h5_path, name) + 4, 4)
        with pytest.raises(UserError, match='its arrays fail their sha256 check|offsets do not index'):
            load_pose_cache(h5_path)
        messages = []
        assert pose_cache(str(tmp_path / 's.csv'), str(tmp_path / 'cache'), log=messages.append) == h5_path
        assert len(messages) == 1 and messages[0].startswith(f"pose cache {h5_path}: rebuilt: its ")
        assert Path(h5_path).read_bytes() == good


@pytest.mark.parametrize('damage', ['first clip', 'last clip', 'labels', 'mean'])
def test_garbage_in_the_audio_cache_is_rebuilt(tmp_path, audio_cache, damage):
    [h5_path] = audio_cache.rglob('train.h5')
    with h5py.File(h5_path, 'r') as f:
        good = f['features'][()]
    if damage == 'mean':
        with h5py.File(h5_path, 'r+') as f:
            f.attrs['mean'] = np.nan
    else:
        offset = data_offset(h5_path, 'labels') if damage == 'labels' else \
            data_offset(h5_path, 'features', 0 if damage == 'first clip' else len(good) - 1)
        overwrite(h5_path, offset + 100 if damage != 'labels' else offset, 4)
    messages = []
    prepare_audio_cache(str(audio_cache), SHORT, LABELS, data=str(audio_cache.parent / 'good.npz'),
                        splits=('train',), log=messages.append)
    why = {'first clip': 'clip 0 fails its sha256', 'last clip': f'clip {len(good) - 1} fails its sha256',
           'labels': 'labels fail their sha256', 'mean': 'mean/std are not finite'}[damage]
    assert 'building' in messages[0] and why in messages[0]
    with h5py.File(h5_path, 'r') as f:
        assert np.array_equal(f['features'][()], good)


def test_garbage_in_builtin_data_is_written_again(tmp_path):
    messages = []
    vae = data.builtin_vae_data('grids', str(tmp_path), 20)
    signs = data.write_sign_csvs(str(tmp_path / 'signs'), num_classes=2, clips_per_class=(2, 1, 1))
    manifest = write_sleep_sounds(str(tmp_path / 'sounds'), n_clips=6, seed=0)
    wav = sorted((tmp_path / 'sounds' / 'wavs').iterdir())[3]
    good, grids = (snapshot(tmp_path / 'sounds'), snapshot(tmp_path / 'signs')), load_vae_data(vae)[0]
    overwrite(vae, 40, 2)
    overwrite(signs[1], 200, 1)
    overwrite(wav, 1000, 2)
    assert data.builtin_vae_data('grids', str(tmp_path), 20, log=messages.append) == vae
    assert data.write_sign_csvs(str(tmp_path / 'signs'), num_classes=2, clips_per_class=(2, 1, 1),
                                log=messages.append) == signs
    assert write_sleep_sounds(str(tmp_path / 'sounds'), n_clips=6, seed=0, log=messages.append) == manifest
    assert [m.split(': ', 1)[1] for m in messages] == [
        f'written again: {os.path.basename(vae)} fails its sha256 check (it changed after it was written)',
        'written again: val.csv fails its sha256 check (it changed after it was written)',
        f'written again: wavs/{wav.name} fails its sha256 check (it changed after it was written)']
    assert (snapshot(tmp_path / 'sounds'), snapshot(tmp_path / 'signs')) == good  # deterministic: the same bytes
    assert np.array_equal(load_vae_data(vae)[0], grids)  # (an npz holds zip timestamps)


def test_garbage_in_the_teacher_logits_is_computed_again(tmp_path):
    """train_kd.py end to end: same-size garbage in the cached logits is detected by their sha256 and recomputed."""
    manifest = write_sleep_sounds(str(tmp_path / 'sounds'), n_clips=40, seed=2)
    tiny = ['--device=cpu', '--clip_seconds=0.5', '--batch_size=8', '--num_workers=0', f'--manifest={manifest}',
            '--max_epochs=1']
    run_script('train_audio.py', *tiny, '--arch=crnn', '--out_dir=teacher', cwd=tmp_path)
    kd = ['train_kd.py', *tiny, '--teacher_ckpt=teacher/best.pt', '--gate=False']
    assert ': computed (' in run_script(*kd, '--out_dir=kd1', cwd=tmp_path).stdout
    [logits] = (tmp_path / 'cache').rglob('train.teacher_*.npy')
    good = np.load(logits)
    overwrite(logits, len(logits.read_bytes()) - 8, 4)  # one logit changed: still a valid .npy of that shape
    assert np.load(logits).shape == good.shape and not np.array_equal(np.load(logits), good)
    proc = run_script(*kd, '--out_dir=kd2', cwd=tmp_path)
    where = logits.relative_to(tmp_path)  # cache_dir='cache', relative
    assert f'teacher logits {where}: computed again: {logits.name} fails its sha256 check' in proc.stdout
    assert ': computed (' in proc.stdout and np.allclose(np.load(logits), good, atol=1e-5)


# -----------------------------------------------------------------------------
# 2c. non-finite audio is skipped, counted and named; statistics in float64
# -----------------------------------------------------------------------------

def float_wav(path, samples, rate=16000):
    """A 32-bit IEEE-float WAV (format tag 3), written field by field."""
    body = np.asarray(samples, '<f4').tobytes()
    fmt = struct.pack('<HHIIHH', 3, 1, rate, rate * 4, 4, 32)
    riff = b'WAVE' + b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'data' + struct.pack('<I', len(body)) + body
    path.write_bytes(b'RIFF' + struct.pack('<I', len(riff)) + riff)


def test_a_finite_but_huge_float_wav_is_skipped_and_named(tmp_path):
    """Samples near 3e29 are finite, but their power overflows float32: the clip's log-mel is NaN, which made the
    cached mean/std NaN and the run stop later with 'training loss is nan', naming nothing."""
    rng = np.random.default_rng(0)
    rows = ['path,label,split']
    for i in range(4):
        write_wav(tmp_path / f'{i}.wav', rng.uniform(-0.5, 0.5, 8000), 16000)
        rows.append(f'{i}.wav,{["quiet", "snore"][i % 2]},train')
    float_wav(tmp_path / 'loud.wav', 3e29 * rng.uniform(-1, 1, 8000))
    rows.append('loud.wav,breathe,train')
    (tmp_path / 'm.csv').write_text('\n'.join(rows) + '\n')
    messages = []
    paths, _ = prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, manifest=str(tmp_path / 'm.csv'),
                                   splits=('train',), log=messages.append)
    assert f"1 empty/non-finite clips skipped: {tmp_path / 'loud.wav'} (non-finite log-mel)" in messages[-1]
    with h5py.File(paths['train'], 'r') as f:
        values = f['features'][()].astype(np.float64)
        assert f.attrs['skipped'] == 1 and f.attrs['n_samples'] == 4 and list(f['labels'][()]) == [0, 2, 0, 2]
        assert np.isclose(f.attrs['mean'], values.mean(), rtol=1e-9) and np.isclose(f.attrs['std'], values.std(),
                                                                                    rtol=1e-6)


def test_skipped_array_rows_are_named_by_row(tmp_path):
    waves = np.random.default_rng(0).uniform(-0.5, 0.5, (6, 800)).astype(np.float32)
    waves[2, 5], waves[4] = np.inf, 3e29
    np.savez(tmp_path / 'w.npz', waveforms=waves, labels=np.array(['quiet'] * 6), split=np.array(['train'] * 6))
    messages = []
    prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, data=str(tmp_path / 'w.npz'), splits=('train',),
                        log=messages.append)
    path = tmp_path / 'w.npz'
    assert messages[-1].endswith(f"2 empty/non-finite clips skipped: {path} row 2 (non-finite samples), {path} row 4 "
                                 f"(non-finite log-mel)")
    waves[:] = np.nan
    np.savez(tmp_path / 'w.npz', waveforms=waves, labels=np.array(['quiet'] * 6), split=np.array(['train'] * 6))
    with pytest.raises(UserError, match=r"none of the 6 clips is usable .*: .*row 0 \(non-finite samples\), .*row 1 "
                                        r".*row 2 .*, \.\.\.$"):
        prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, data=str(path), splits=('train',))


# -----------------------------------------------------------------------------
# 3. bad inputs: one UserError naming the file and what was expected; every file byte-identical afterwards
# -----------------------------------------------------------------------------

def spoter_rows(tmp_path, n_classes=4):
    clips, labels = make_sign_clips(n_classes, 2, seed=0, min_frames=4, max_frames=6)
    write_spoter_csv(tmp_path / 'in.csv', clips, labels)
    with open(tmp_path / 'in.csv', newline='') as f:
        return list(csv.reader(f))


def write_csv(path, rows):
    text = io.StringIO()
    csv.writer(text, lineterminator='\n').writerows(rows)
    path.write_text(text.getvalue())


def set_track(tmp_path, row, column, value):
    rows = spoter_rows(tmp_path)
    n = len(json.loads(rows[row][1]))
    rows[row][rows[0].index(column)] = json.dumps([value] + [0.5] * (n - 1))
    write_csv(tmp_path / 'in.csv', rows)


def set_label(tmp_path, row, value):
    rows = spoter_rows(tmp_path)
    rows[row][0] = value
    write_csv(tmp_path / 'in.csv', rows)


def manifest(tmp_path, text, encoding='utf-8'):
    write_wav(tmp_path / 'a.wav', np.zeros(800), 16000)
    (tmp_path / 'in.csv').write_bytes(text.encode(encoding))


def waveform_file(tmp_path, **changes):
    arrays = dict(waveforms=np.zeros((3, 800), np.float32), labels=np.array(['quiet', 'snore', 'breathe']))
    np.savez(tmp_path / 'in.npz', **dict(arrays, **changes))


def audio_from(kind):
    def call(tmp_path):
        source = dict(manifest=str(tmp_path / 'in.csv')) if kind == 'manifest' else dict(data=str(tmp_path / 'in.npz'))
        prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, splits=('train',), **source)
    return call


def spoter_training_file(tmp_path):
    """What train_spoter.py does with a training CSV: cache it, read it, resolve its labels."""
    labels = load_pose_cache(pose_cache(str(tmp_path / 'in.csv'), str(tmp_path / 'cache')))[2]
    resolve_label_offset(labels, 'auto', None, str(tmp_path / 'in.csv'))


def spoter_file(tmp_path):
    pose_cache(str(tmp_path / 'in.csv'), str(tmp_path / 'cache'))  # reads the CSV before it writes anything


def vae_file(tmp_path):
    load_vae_data(str(tmp_path / 'in.npz'))


def text_file(tmp_path):
    prepare_text(str(tmp_path / 'in.txt'), str(tmp_path / 'cache'))


LATIN1 = 'path,label\na.wav,quiet\ncaf\u00e9.wav,quiet\n'
BAD_INPUTS = [  # (write the bad input, run the reader, what the message says after the file's name)
    (lambda t: manifest(t, LATIN1, 'latin-1'), audio_from('manifest'),
     r"manifest .*in\.csv: row 3: not a readable UTF-8 CSV \(byte 26 is b'\\xe9': Latin-1 or UTF-16\? save it as UTF-8"),
    (lambda t: manifest(t, LATIN1, 'utf-16'), audio_from('manifest'), r"in\.csv: row 1: not a readable UTF-8 CSV"),
    (lambda t: manifest(t, ''), audio_from('manifest'), r"in\.csv is empty: expected a header with a path column"),
    (lambda t: manifest(t, 'path,label\n\n'), audio_from('manifest'), r"in\.csv has a header but no data rows"),
    (lambda t: manifest(t, 'path,label\na.wav,quiet\n,snore\n'), audio_from('manifest'),
     r"in\.csv, row 3, column 'path': empty; expected the path of a WAV file"),
    (lambda t: manifest(t, 'path,label\na.wav\n'), audio_from('manifest'),
     r"in\.csv, row 2, column 'label': label '' is not in label_map"),
    (lambda t: waveform_file(t, waveforms=np.array([['a', 'b']] * 3)), audio_from('array'),
     r"in\.npz: 'waveforms' has dtype <U1; expected float samples in \[-1, 1\] or int16"),
    (lambda t: waveform_file(t, waveforms=np.zeros((3, 800), np.int32)), audio_from('array'), r"has dtype int32"),
    (lambda t: waveform_file(t, waveforms=np.zeros((3, 2, 800))), audio_from('array'),
     r"expected waveforms \(N, L\) and labels \(N,\), got \(3, 2, 800\)"),
    (lambda t: waveform_file(t, labels=np.array([['quiet']] * 3)), audio_from('array'), r"got \(3, 800\) and \(3, 1\)"),
    *[(lambda t, r=rate: waveform_file(t, sample_rate=r), audio_from('array'),
       rf"in\.npz: 'sample_rate' is {shown}; expected one positive integer \(Hz\)")
      for rate, shown in [(np.int64(0), '0'), (np.int64(-8000), '-8000'), (np.array([16000, 8000]), r'\[16000, 8000\]'),
                          (np.float64(16000.5), '16000.5'), (np.float64(np.nan), 'nan'), (np.array('16k'), "'16k'")]],
    (lambda t: waveform_file(t, split=np.array(['train'] * 2)), audio_from('array'),
     r"'split' has shape \(2,\); expected \(3,\), one split name per waveform"),
    (lambda t: waveform_file(t, split=np.array(['train'] * 4)), audio_from('array'), r"'split' has shape \(4,\)"),
    (lambda t: waveform_file(t, lengths=np.array([800, -1, 5])), audio_from('array'),
     r"'lengths'\[1\] = -1 is outside 0\.\.800 \(the row length of 'waveforms'\); 1 lengths are"),
    (lambda t: waveform_file(t, lengths=np.array([801, 900, 5])), audio_from('array'), r"'lengths'\[0\] = 801"),
    (lambda t: waveform_file(t, lengths=np.array([8.0, 9.0, 5.0])), audio_from('array'),
     r"'lengths' has shape \(3,\) and dtype float64; expected \(3,\) integers"),
    (lambda t: waveform_file(t, lengths=np.array([8, 9])), audio_from('array'), r"'lengths' has shape \(2,\)"),
    (lambda t: set_label(t, 3, '100000'), spoter_training_file,
     r"in\.csv: row 3: label 100000 would make 100,001 classes for 5 distinct labels \(more than half unused\); "
     r"labels must be dense, 0\.\.C-1 or 1\.\.C"),
    (lambda t: set_label(t, 8, '10'), spoter_training_file, r"row 8: label 10 would make 11 classes for 5 distinct"),
    (lambda t: set_track(t, 2, 'leftWrist_X', 320.0), spoter_file,
     r"in\.csv: row 2, column leftWrist_X: 320 \(frame 0\) is outside \[0, 1\]; expected coordinates normalized by the "
     r"frame size \(0 = missing joint\), not pixels"),
    (lambda t: set_track(t, 1, 'nose_Y', -0.25), spoter_file, r"row 1, column nose_Y: -0.25 \(frame 0\) is outside"),
    (lambda t: set_track(t, 1, 'nose_Y', float('nan')), spoter_file, r"row 1, column nose_Y: contains a NaN"),
    (lambda t: (t / 'in.csv').write_bytes('labels,nose_X\n1,"[0.5]"\n2,caf\u00e9\n'.encode('latin-1')),
     spoter_file, r"in\.csv: row 2: not a readable UTF-8 CSV \(byte 29 is b'\\xe9'"),
    (lambda t: (t / 'in.csv').write_text(','.join(['labels'] + data.SPOTER_COLUMNS) + '\n\n'), spoter_file,
     r"in\.csv has a header but no data rows"),
    (lambda t: np.savez(t / 'in.npz', grids=np.array([0, 7, 5000] * 12).reshape(4, 3, 3)), vae_file,
     r"in\.npz: class ids must be dense \(0\.\.C-1\) when num_classes=0, but only 3 distinct ids occur \(0, 7, 5000\), "
     r"up to 5000: 5,001 classes, most of them unused; remap the ids to 0\.\.2, or set num_classes=5001 to keep them"),
    (lambda t: np.savez(t / 'in.npz', grids=np.zeros((0, 3, 3), np.uint8)), vae_file, r"has shape \(0, 3, 3\)"),
    (lambda t: (t / 'in.txt').write_bytes('caf\u00e9\n'.encode('latin-1')), text_file,
     r"in\.txt is not UTF-8 text \(line 1, byte 3: b'\\xe9'; Latin-1 or UTF-16\? save it as UTF-8\)"),
    (lambda t: (t / 'in.txt').write_bytes('hi\n'.encode('utf-16')), text_file, r"in\.txt is not UTF-8 text"),
]


@pytest.mark.parametrize('make, read, message', BAD_INPUTS)
def test_bad_inputs_are_one_clear_error_and_change_no_file(tmp_path, audio_cache, make, read, message):
    make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        read(tmp_path)
    assert '\n' not in str(e.value) and str(tmp_path / 'in.') in str(e.value)
    assert e.match(message)
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before  # every file there before is byte-identical
    if read is spoter_training_file:  # only the pose cache of that (readable) CSV, complete, was added
        new = set(after) - set(before)
        assert len(new) == 1 and new.pop().startswith('cache/spoter/') and data._read_pose_cache(
            str(next((tmp_path / 'cache' / 'spoter').iterdir())))[1] is None
    else:
        assert after == before


def test_dense_training_labels_and_sparse_val_labels_are_accepted():
    """The rule binds the file that sets the class count ('auto', num_classes None): 0- or 1-based with classes
    missing passes up to half; val/test files (an int offset, or num_classes given) may hold any few classes."""
    assert resolve_label_offset(np.array([1, 2, 4, 5, 6]), 'auto', None, 'x.csv')[1] == 1  # 6 classes, 5 seen
    assert resolve_label_offset(np.array([0, 1, 5]), 'auto', None, 'x.csv')[0].max() == 5  # 6 classes, 3 seen: half
    assert resolve_label_offset(np.array([0, 57]), 0, None, 'x.csv')[0].tolist() == [0, 57]
    assert resolve_label_offset(np.array([3, 99]), 1, 100, 'x.csv')[0].tolist() == [2, 98]
    with pytest.raises(UserError, match=r"x\.csv: row 3 of the kept rows: label 8 would make 9 classes for 3"):
        resolve_label_offset(np.array([0, 1, 8]), 'auto', None, 'x.csv')


def test_an_all_unknown_text_reports_what_a_warning_needs(tmp_path):
    (tmp_path / 'ru.txt').write_text('привет мир\n' * 200)
    _, meta = prepare_text(str(tmp_path / 'ru.txt'), str(tmp_path / 'cache'))
    assert meta['chars'] == 2200 and meta['unk_count'] == 1800  # 9 of 11 characters are Cyrillic
    assert meta['unk_top'][:2] == [['и', 400], ['р', 400]] and len(meta['unk_top']) == 5  # ties: by code point


def test_npz_reading_needs_no_numpy_pickling(tmp_path):
    """A zip that is not an npz, an npz member of an unknown .npy version, and a plain .npy are one clear error."""
    with zipfile.ZipFile(tmp_path / 'v9.npz', 'w') as z:
        z.writestr('grids.npy', b'\x93NUMPY\x09\x00' + bytes(100))
    with open(tmp_path / 'plain.npz', 'wb') as f:  # a .npy under an .npz name
        np.save(f, np.zeros((2, 3, 3), np.uint8))
    for name, message in (('v9.npz', r"cannot read it as \.npz or HDF5 \(ValueError: "), ('plain.npz', 'BadZipFile')):
        with pytest.raises(UserError, match=message):
            load_vae_data(str(tmp_path / name))
