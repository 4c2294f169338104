"""Audio data: the log-mel definition against a slow reference written from the formulas, WAV round trips, the
manifest and waveform-array readers, and the HDF5 feature cache (atomic, validated, rebuilt, lazily opened)."""
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV

from common import UserError
from data import (AUDIO_FEATURES, SpectrogramCache, log_mel_spectrogram, mel_filterbank, prepare_audio_cache,
                  read_audio_manifest, read_wav, resample, write_sleep_sounds, write_wav)

LABELS = {'quiet': 0, 'breathe': 1, 'snore': 2}
SHORT = dict(AUDIO_FEATURES, clip_seconds=0.5)  # 51 frames: quick caches


# -----------------------------------------------------------------------------
# log-mel: an independent slow reference (explicit DFT, per-filter loops), straight from the formulas
# -----------------------------------------------------------------------------

def slaney_hz_to_mel(f):
    return f / (200 / 3) if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)


def slaney_mel_to_hz(m):
    return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)


def reference_log_mel(y, sr=16000, n_fft=512, win=400, hop=160, n_mels=64, fmin=20.0, fmax=8000.0, top_db=80.0):
    y = np.asarray(y, dtype=np.float64)
    padded = np.concatenate([np.zeros(n_fft // 2), y, np.zeros(n_fft // 2)])  # centred frames, zero padding
    n_frames = 1 + len(y) // hop
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / win) for n in range(win)])  # periodic: divide by N
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2:(n_fft - win) // 2 + win] = hann
    k, n = np.arange(n_fft // 2 + 1)[:, None], np.arange(n_fft)[None, :]
    dft = np.exp(-2j * math.pi * k * n / n_fft)  # (bins, n_fft)
    frames = np.stack([padded[t * hop:t * hop + n_fft] * window for t in range(n_frames)], axis=1)
    power = np.abs(dft @ frames) ** 2  # (bins, frames)
    edges = [slaney_mel_to_hz(m) for m in np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2)]
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    filters = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        for b, f in enumerate(freqs):
            tri = min((f - lo) / (mid - lo), (hi - f) / (hi - mid))
            filters[i, b] = max(0.0, tri) * 2 / (hi - lo)  # Slaney area normalisation
    mel = filters @ power
    db = 10 * np.log10(np.maximum(mel, 1e-10)) - 10 * np.log10(max(mel.max(), 1e-10))
    return np.maximum(db, db.max() - top_db)


def signals():
    rng, sr = np.random.default_rng(0), 16000
    t = np.arange(sr) / sr
    return {
        'sweep': np.sin(2 * np.pi * (50 * t + 3975 * t ** 2)),  # 50 Hz -> 8 kHz
        'noise': 0.3 * rng.standard_normal(sr),
        'burst': np.where((t > 0.4) & (t < 0.45), rng.standard_normal(sr), 0) + 1e-4 * rng.standard_normal(sr),
        'near_silence': 1e-6 * rng.standard_normal(sr),
        'odd_length': 0.5 * rng.standard_normal(12345),
        'tiny': 0.5 * rng.standard_normal(161),
    }


@pytest.mark.parametrize('name', list(signals()))
def test_log_mel_matches_the_reference_within_001_db(name):
    y = signals()[name].astype(np.float32)
    ours, ref = log_mel_spectrogram(y), reference_log_mel(y)
    assert ours.shape == ref.shape == (64, 1 + len(y) // 160) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 0.01


def test_log_mel_invariants():
    y = signals()['noise'].astype(np.float32)
    db = log_mel_spectrogram(np.tile(y, 5))
    assert db.shape == (64, 501)  # a 5.0 s clip
    assert db.max() == 0.0 and db.min() >= -80.0  # ref = the clip's maximum, floor 80 dB below
    assert np.abs(log_mel_spectrogram(10 * y) - log_mel_spectrogram(y)).max() < 1e-3  # gain-invariant (ref=max)
    assert np.array_equal(log_mel_spectrogram(np.zeros(1600, np.float32)), np.zeros((64, 11), np.float32))


def test_mel_filters_have_unit_area_and_slaney_edges():
    weights = mel_filterbank(16000, 512, 64, 20.0, 8000.0).numpy().astype(np.float64)
    areas = weights.sum(1) * 16000 / 512  # Hz-weighted: each triangle of height 2/(hi-lo) has area 1
    assert np.allclose(areas[20:], 1, atol=0.05)  # wide filters; the narrowest few are undersampled by the bins
    assert (weights >= 0).all() and (weights.sum(1) > 0).all()
    assert abs(slaney_mel_to_hz(slaney_hz_to_mel(1000)) - 1000) < 1e-9 and slaney_hz_to_mel(1000) == 15


# -----------------------------------------------------------------------------
# WAV files
# -----------------------------------------------------------------------------

@pytest.mark.parametrize('bits', [8, 16, 24, 32])
@pytest.mark.parametrize('channels', [1, 2])
def test_wav_round_trip(tmp_path, bits, channels):
    x = np.random.default_rng(bits).uniform(-0.9, 0.9, 999)
    write_wav(tmp_path / 'a.wav', x, 22050, bits, channels)
    y, rate = read_wav(str(tmp_path / 'a.wav'))
    assert rate == 22050 and y.shape == x.shape and y.dtype == np.float32
    assert np.abs(y - x).max() < max(1.5 / 2 ** (bits - 1), 1e-7)  # one quantisation step (or float32 rounding)


def float_wav(path, samples, rate, extensible=False):
    """A 32-bit IEEE-float WAV written field by field (format tag 3, or 0xFFFE with the float sub-format)."""
    data = np.asarray(samples, '<f4').tobytes()
    if extensible:
        fmt = struct.pack('<HHIIHHHHI16s', 0xFFFE, 1, rate, rate * 4, 4, 32, 22, 32, 4, struct.pack('<H', 3) + bytes(14))
    else:
        fmt = struct.pack('<HHIIHH', 3, 1, rate, rate * 4, 4, 32)
    body = b'WAVE' + b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'data' + struct.pack('<I', len(data)) + data
    path.write_bytes(b'RIFF' + struct.pack('<I', len(body)) + body)


@pytest.mark.parametrize('extensible', [False, True])
def test_float_wav_is_read_exactly(tmp_path, extensible):
    x = np.random.default_rng(0).uniform(-1, 1, 500).astype(np.float32)
    float_wav(tmp_path / 'f.wav', x, 16000, extensible)
    y, rate = read_wav(str(tmp_path / 'f.wav'))
    assert rate == 16000 and np.array_equal(y, x)


def test_bad_wavs_are_clear(tmp_path):
    (tmp_path / 'text.wav').write_text('hello, not audio')
    with pytest.raises(UserError, match=r'text\.wav: not a RIFF/WAVE file'):
        read_wav(str(tmp_path / 'text.wav'))
    fmt = struct.pack('<HHIIHH', 2, 1, 16000, 8000, 1, 4)  # format 2 = MS ADPCM
    body = b'WAVE' + b'fmt ' + struct.pack('<I', 16) + fmt + b'data' + struct.pack('<I', 4) + bytes(4)
    (tmp_path / 'adpcm.wav').write_bytes(b'RIFF' + struct.pack('<I', len(body)) + body)
    with pytest.raises(UserError, match=r'adpcm\.wav: unsupported sample format \(format tag 2, 4 bits'):
        read_wav(str(tmp_path / 'adpcm.wav'))
    with pytest.raises(UserError, match=r'missing\.wav: cannot be read'):
        read_wav(str(tmp_path / 'missing.wav'))


def test_resample_keeps_a_band_limited_tone():
    t8, t16 = np.arange(8000) / 8000, np.arange(16000) / 16000
    tone = lambda t: np.sin(2 * np.pi * 440 * t)  # noqa: E731  (440 whole cycles per clip: periodic, exact)
    assert np.abs(resample(tone(t8).astype(np.float32), 8000, 16000) - tone(t16)).max() < 1e-4


# -----------------------------------------------------------------------------
# manifests, waveform arrays, the feature cache
# -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def sounds(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sounds')
    return write_sleep_sounds(str(folder), n_clips=40, seed=1)


def test_builtin_sounds_follow_the_real_shares_and_format(tmp_path):
    manifest = write_sleep_sounds(str(tmp_path), n_clips=400, seed=0)
    splits, left_out = read_audio_manifest(manifest, LABELS)
    labels = np.array([label for items in splits.values() for _, label in items])
    shares = np.bincount(labels, minlength=3) / len(labels)
    assert left_out == 0 and np.allclose(shares, [0.55, 0.35, 0.10], atol=0.06)
    assert sorted(splits) == ['test', 'train', 'val'] and len(splits['train']) > len(splits['val'])
    waveform, rate = read_wav(splits['train'][0][0])
    assert rate == 16000 and 0.6 * 16000 <= len(waveform) <= 1.4 * 16000
    assert write_sleep_sounds(str(tmp_path), n_clips=400, seed=0) == manifest  # reused, not rewritten


def test_manifest_label_columns_ids_and_left_out_classes(tmp_path, sounds):
    wav = os.path.relpath(read_audio_manifest(sounds, LABELS)[0]['train'][0][0], tmp_path)
    (tmp_path / 'm.csv').write_text(f"file,event_label\n{wav},7\n{wav},breathe\n{wav},cough\n{wav},0\n")
    splits, left_out = read_audio_manifest(str(tmp_path / 'm.csv'), LABELS)
    assert left_out == 1  # 'cough' is a DreamCatcher class the 3-class task leaves out
    assert sorted(label for items in splits.values() for _, label in items) == [0, 1, 2]  # 7 = snore, 0 = quiet
    (tmp_path / 'bad.csv').write_text(f"path,label\n{wav},quiet\n{wav},dog\n")
    with pytest.raises(UserError, match=r"bad\.csv, row 3, column 'label': label 'dog' is not in label_map"):
        read_audio_manifest(str(tmp_path / 'bad.csv'), LABELS)
    (tmp_path / 'nolabel.csv').write_text(f"path,kind\n{wav},quiet\n")
    with pytest.raises(UserError, match=r"nolabel\.csv: needs a path column .* and a label column"):
        read_audio_manifest(str(tmp_path / 'nolabel.csv'), LABELS)


def test_missing_audio_file_is_named_before_any_work(tmp_path, sounds):
    (tmp_path / 'm.csv').write_text("path,label,split\nnowhere/x.wav,quiet,train\n")
    with pytest.raises(UserError, match=r"nowhere/x\.wav: no such file \(1 of 1 clips missing\)"):
        prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, manifest=str(tmp_path / 'm.csv'),
                            splits=('train',))
    assert not list((tmp_path / 'cache').rglob('*.h5*'))


def test_cache_layout_reuse_and_rebuild_on_other_settings(tmp_path, sounds):
    messages = []
    paths, _ = prepare_audio_cache(str(tmp_path), SHORT, LABELS, manifest=sounds, log=messages.append)
    with h5py.File(paths['train'], 'r') as f:
        features, labels = f['features'], f['labels'][()]
        assert features.chunks == (1, 64, 51) and features.compression is None and f.attrs['complete']
        assert features.shape == (len(labels), 64, 51) and f.attrs['n_samples'] == len(labels)
        values = features[()]
        assert np.isclose(f.attrs['mean'], values.mean(), atol=1e-3) and np.isclose(f.attrs['std'], values.std(),
                                                                                    atol=1e-3)
    stamp = os.stat(paths['train']).st_mtime_ns
    prepare_audio_cache(str(tmp_path), SHORT, LABELS, manifest=sounds, log=messages.append)
    assert os.stat(paths['train']).st_mtime_ns == stamp and 'up to date' in messages[-1]  # reused
    other, _ = prepare_audio_cache(str(tmp_path), dict(SHORT, n_mels=32), LABELS, manifest=sounds,
                                   log=messages.append, splits=('train',))
    assert other['train'] != paths['train'] and os.stat(paths['train']).st_mtime_ns == stamp  # its own folder
    with h5py.File(other['train'], 'r') as f:
        assert f['features'].shape[1] == 32
    with h5py.File(other['train'], 'r+') as f:  # a cache whose attributes say other settings (copied, edited) ...
        f.attrs['feature_hash'] = 'something else'
    prepare_audio_cache(str(tmp_path), dict(SHORT, n_mels=32), LABELS, manifest=sounds, log=messages.append,
                        splits=('train',))
    assert any('feature_hash differs' in m for m in messages)  # ... is detected by its attributes and rebuilt
    prepare_audio_cache(str(tmp_path), dict(SHORT, n_mels=32), LABELS, manifest=sounds, splits=('train',),
                        skip_existing=False, log=messages.append)
    assert 'skip_existing=False' in messages[-2]


def test_corrupt_cache_is_rebuilt_and_failed_build_keeps_the_old_file(tmp_path, sounds):
    root = os.path.dirname(sounds)
    manifest = tmp_path / 'm.csv'
    manifest.write_text(open(sounds).read())
    paths, _ = prepare_audio_cache(str(tmp_path), SHORT, LABELS, manifest=str(manifest), audio_root=root,
                                   splits=('val',))
    good = open(paths['val'], 'rb').read()
    open(paths['val'], 'wb').write(good[:len(good) // 2])  # truncated
    messages = []
    prepare_audio_cache(str(tmp_path), SHORT, LABELS, manifest=str(manifest), audio_root=root, splits=('val',),
                        log=messages.append)
    assert 'cannot be read' in messages[0] and open(paths['val'], 'rb').read() == good  # rebuilt, identical
    (tmp_path / 'junk.wav').write_text('junk')  # the manifest gains a clip that is not a WAV: a rebuild that fails
    manifest.write_text(open(sounds).read() + f"{tmp_path / 'junk.wav'},quiet,val\n")
    with pytest.raises(UserError, match=r'junk\.wav: not a RIFF/WAVE file'):
        prepare_audio_cache(str(tmp_path), SHORT, LABELS, manifest=str(manifest), audio_root=root, splits=('val',))
    assert open(paths['val'], 'rb').read() == good and not list(tmp_path.rglob('*.tmp*'))  # the old cache is intact


def test_unreadable_or_incomplete_waveform_files_name_the_file(tmp_path):
    junk = tmp_path / 'junk.npz'
    junk.write_bytes(b'not a zip file')
    with pytest.raises(UserError, match=r"waveform file .*junk\.npz: cannot read it as \.npz or HDF5"):
        prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, data=str(junk), splits=('train',))
    assert junk.read_bytes() == b'not a zip file' and not (tmp_path / 'cache').exists()  # nothing written
    np.savez(tmp_path / 'w.npz', waveforms=np.zeros((2, 800), np.float32))
    with pytest.raises(UserError, match=r"w\.npz: no 'labels' array \(it has \['waveforms'\]\)"):
        prepare_audio_cache(str(tmp_path / 'cache'), SHORT, LABELS, data=str(tmp_path / 'w.npz'), splits=('train',))


def test_nan_and_empty_clips_are_skipped_and_counted(tmp_path):
    waves = np.random.default_rng(0).uniform(-0.5, 0.5, (5, 800)).astype(np.float32)
    waves[1, 3] = np.nan
    np.savez(tmp_path / 'w.npz', waveforms=waves, labels=np.array(['quiet', 'snore', 'breathe', 'quiet', '5']),
             lengths=np.array([800, 800, 0, 400, 800]), split=np.array(['train'] * 5))
    paths, _ = prepare_audio_cache(str(tmp_path), SHORT, LABELS, data=str(tmp_path / 'w.npz'), splits=('train',))
    with h5py.File(paths['train'], 'r') as f:
        assert f.attrs['skipped'] == 2 and list(f['labels'][()]) == [0, 0, 1]  # '5' is DreamCatcher's breathe


def test_kill_mid_build_leaves_no_readable_partial(tmp_path):
    waves = np.random.default_rng(0).uniform(-0.5, 0.5, (1500, 8000)).astype(np.float32)
    np.savez(tmp_path / 'w.npz', waveforms=waves, labels=np.zeros(1500, np.int64), split=np.array(["train"] * 1500))
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from data import *; "
            f"prepare_audio_cache({str(tmp_path)!r}, dict(AUDIO_FEATURES), {LABELS!r}, data={str(tmp_path / 'w.npz')!r},"
            f" splits=('train',))")
    proc = subprocess.Popen([sys.executable, '-c', code], env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.rglob('train.h5.tmp*')) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.rglob('train.h5.tmp*')) and not list(tmp_path.rglob('train.h5'))  # only the .tmp exists
    messages = []  # the next run never reads the .tmp: it builds a complete file (small now, to stay quick)
    np.savez(tmp_path / 'w.npz', waveforms=waves[:20], labels=np.zeros(20, np.int64), split=np.array(['train'] * 20))
    paths, _ = prepare_audio_cache(str(tmp_path), SHORT, LABELS, data=str(tmp_path / 'w.npz'), splits=('train',),
                                   log=messages.append)
    assert 'does not exist' in messages[0] and len(SpectrogramCache(paths['train'])) == 20


def test_dataset_opens_lazily_and_workers_read_the_same(tmp_path, sounds):
    paths, _ = prepare_audio_cache(str(tmp_path), SHORT, LABELS, manifest=sounds, splits=('train',))
    dataset = SpectrogramCache(paths['train'])
    assert dataset._file is None  # nothing open before the first read
    x, y = dataset[0]
    assert x.shape == (1, 64, 51) and dataset._file is not None
    assert pickle.loads(pickle.dumps(dataset))._file is None  # what a worker receives: no handle
    loader = lambda workers: torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers,  # noqa: E731
                                                         persistent_workers=workers > 0)
    serial, parallel = list(loader(0)), list(loader(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, parallel))


def test_preprocess_entry_point_builds_only_the_splits_asked(tmp_path, sounds):
    args = [sys.executable, str(ROOT / 'data.py'), 'audio', f'--manifest={sounds}', '--splits=train',
            '--clip_seconds=0.5', f'--cache_dir={tmp_path}']
    first = subprocess.run(args, env=SCRIPT_ENV, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and 'building' in first.stdout, first.stderr
    assert [p.name for p in tmp_path.rglob('*.h5')] == ['train.h5']
    again = subprocess.run(args + ['--skip_existing=True'], env=SCRIPT_ENV, capture_output=True, text=True, timeout=120)
    assert 'up to date' in again.stdout and 'building' not in again.stdout
