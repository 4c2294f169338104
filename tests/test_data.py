"""Unit tests for data.py's text family: tokenizer, token cache, windows, batches and the resumable sampler."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

import data
from common import UserError
from data import PAD, UNK, CharTokenizer

# the vocabulary policy, written out independently of data.py
PRINTABLE = ''.join(chr(c) for c in range(32, 127))
REFERENCE_IDS = {**{ch: i + 2 for i, ch in enumerate(PRINTABLE)}, '\n': 97, '\t': 98}
NON_ASCII = ['\u00e9', '\u20ac', '\r', '\x00', '\x7f', '\x1b', '\u4f60', '\U0001F600', '\u00a0']


def reference_encode(text):
    return [REFERENCE_IDS.get(ch, UNK) for ch in text]


# -----------------------------------------------------------------------------
# CharTokenizer
# -----------------------------------------------------------------------------

def test_tokenizer_vocabulary():
    tok = CharTokenizer()
    assert tok.vocab_size == 99
    assert (PAD, UNK) == (0, 1)
    assert tok.encode(' ') == [2] and tok.encode('~') == [96] and tok.encode('\n') == [97] and tok.encode('\t') == [98]
    assert tok.encode(PRINTABLE + '\n\t') == list(range(2, 99))
    assert tok.decode([PAD, UNK, 2, 96, 97, 98]) == '\ufffd ~\n\t'


def test_tokenizer_round_trip_all_printable():
    tok = CharTokenizer()
    text = PRINTABLE + '\n' + '\t' + 'def f(x):\n\treturn x  # ~\n'
    ids = tok.encode(text)
    assert UNK not in ids and PAD not in ids
    assert tok.decode(ids) == text


def test_tokenizer_non_ascii_is_unk():
    tok = CharTokenizer()
    text = 'caf' + ''.join(NON_ASCII) + ' ok\r\n' + '\u00e9' * 3
    ids = tok.encode(text)
    n_foreign = sum(ch not in REFERENCE_IDS for ch in text)
    assert n_foreign == len(NON_ASCII) + 1 + 3
    assert ids.count(UNK) == n_foreign
    assert len(ids) == len(text)  # one id per character, astral code points included
    assert ids == reference_encode(text)


def test_encode_array_matches_reference_on_random_text():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + NON_ASCII + ['\u0100', '\u07ff', '\uffff', '\U0010ffff']
    text = ''.join(rng.choice(alphabet) for _ in range(5000))
    arr = CharTokenizer().encode_array(text)
    assert arr.dtype == np.uint8 and arr.shape == (len(text),)
    np.testing.assert_array_equal(arr, np.array(reference_encode(text), dtype=np.uint8))


def test_tokenizer_dict_round_trip():
    tok = CharTokenizer()
    d = tok.to_dict()
    assert d['kind'] == 'char'
    assert json.loads(json.dumps(d)) == d  # it goes into checkpoints and meta.json
    tok2 = CharTokenizer.from_dict(json.loads(json.dumps(d)))
    text = PRINTABLE + '\n\t\u00e9\r'
    assert tok2.vocab_size == tok.vocab_size and tok2.encode(text) == tok.encode(text)
    assert tok2.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_tokenizer_lone_surrogate_is_unk():
    assert CharTokenizer().encode('a\udcffb') == [REFERENCE_IDS['a'], UNK, REFERENCE_IDS['b']]


# -----------------------------------------------------------------------------
# window_starts, get_batch
# -----------------------------------------------------------------------------

@pytest.mark.parametrize('n, block, stride', [(100, 8, 8), (100, 8, 3), (17, 8, 4), (17, 8, 8), (9, 8, 1),
                                              (9, 8, 5), (50, 1, 1), (1000, 256, 256), (1000, 32, 7)])
def test_window_starts(n, block, stride):
    starts = data.window_starts(n, block, stride)
    reference = [s for s in range(n) if s + block + 1 <= n and s % stride == 0]
    assert starts.tolist() == reference
    assert len(starts) > 0 and starts[0] == 0
    assert np.all(starts + block + 1 <= n)
    assert np.all(np.diff(starts) == stride)
    last_possible = n - block - 1
    assert (last_possible in starts) == (last_possible % stride == 0)
    assert starts[-1] + stride > last_possible  # nothing on the grid was dropped at the end
    if stride == block:
        assert np.all(starts[:-1] + block <= starts[1:])  # non-overlapping inputs


@pytest.mark.parametrize('n, block', [(8, 8), (3, 8), (0, 8), (0, 1)])
def test_window_starts_too_short(n, block):
    starts = data.window_starts(n, block, 1)
    assert len(starts) == 0


def test_get_batch(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 99, size=200, dtype=np.uint8)
    path = tmp_path / 'train.bin'
    path.write_bytes(tokens.tobytes())
    block = 8
    starts = np.array([0, 5, 191, 5, 100], dtype=np.int64)
    x, y = data.get_batch(str(path), starts, block)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape == (len(starts), block)
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row].numpy(), tokens[s:s + block].astype(np.int64))
        np.testing.assert_array_equal(y[row].numpy(), tokens[s + 1:s + block + 1].astype(np.int64))


def test_get_batch_with_window_starts_covers_file(tmp_path):
    tokens = np.arange(41, dtype=np.uint8)
    path = tmp_path / 'val.bin'
    path.write_bytes(tokens.tobytes())
    starts = data.window_starts(len(tokens), 10, 10)
    x, y = data.get_batch(str(path), starts, 10)
    assert x.flatten().tolist() == list(range(40)) and y.flatten().tolist() == list(range(1, 41))


# -----------------------------------------------------------------------------
# prepare_text
# -----------------------------------------------------------------------------

def corpus_text(n_lines=300):
    return ''.join(f"def f_{i}(x):\r\n\treturn x * {i % 7}  # caf\u00e9 ~\r\n\n" for i in range(n_lines))


def read_split(folder):
    return [np.fromfile(os.path.join(folder, f'{s}.bin'), dtype=np.uint8) for s in ('train', 'val')]


def file_ids(folder):
    return {name: (os.stat(os.path.join(folder, name)).st_ino, os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in ('train.bin', 'val.bin', 'meta.json')}


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / 'corpus.txt'
    path.write_bytes(corpus_text().encode('utf-8'))
    return path


def test_prepare_text_contents(corpus_file, tmp_path):
    cache = tmp_path / 'cache'
    folder, meta = data.prepare_text(str(corpus_file), str(cache))
    assert Path(folder).parent == cache / 'slm'
    text = corpus_text().replace('\r\n', '\n')
    assert '\r' not in text
    expected = np.array(reference_encode(text), dtype=np.uint8)
    train, val = read_split(folder)
    n = len(expected)
    assert len(train) == int(0.95 * n) and len(val) == n - int(0.95 * n)
    np.testing.assert_array_equal(np.concatenate([train, val]), expected)

    assert meta == json.loads((Path(folder) / 'meta.json').read_text())
    assert meta['sha256'] == hashlib.sha256(text.encode('utf-8')).hexdigest()
    assert meta['unk_count'] == text.count('\u00e9') == 300
    assert meta['train_tokens'] == len(train) and meta['val_tokens'] == len(val)
    assert meta['chars'] == len(text)
    assert meta['tokenizer'] == CharTokenizer().to_dict()
    assert meta['source'] == os.path.abspath(corpus_file)
    assert not [p for p in Path(folder).iterdir() if '.tmp' in p.name]


def test_prepare_text_reuses_cache(corpus_file, tmp_path):
    cache = str(tmp_path / 'cache')
    folder, meta = data.prepare_text(str(corpus_file), cache)
    before = file_ids(folder)
    folder2, meta2 = data.prepare_text(str(corpus_file), cache)
    assert folder2 == folder and meta2 == meta
    assert file_ids(folder) == before


def test_prepare_text_new_source_new_folder(corpus_file, tmp_path):
    cache = str(tmp_path / 'cache')
    folder, meta = data.prepare_text(str(corpus_file), cache)
    before = file_ids(folder)
    corpus_file.write_bytes((corpus_text() + 'one more line\n').encode('utf-8'))
    folder2, meta2 = data.prepare_text(str(corpus_file), cache)
    assert folder2 != folder and meta2['sha256'] != meta['sha256']
    assert meta2['train_tokens'] + meta2['val_tokens'] == meta['train_tokens'] + meta['val_tokens'] + 14
    assert file_ids(folder) == before  # the old cache entry is left alone


def test_prepare_text_repairs_truncated_cache(corpus_file, tmp_path):
    cache = str(tmp_path / 'cache')
    folder, meta = data.prepare_text(str(corpus_file), cache)
    good_train, good_val = read_split(folder)
    train_bin = Path(folder) / 'train.bin'
    train_bin.write_bytes(train_bin.read_bytes()[:100])
    folder2, meta2 = data.prepare_text(str(corpus_file), cache)
    assert folder2 == folder and meta2 == meta
    train, val = read_split(folder)
    np.testing.assert_array_equal(train, good_train)
    np.testing.assert_array_equal(val, good_val)


def test_prepare_text_missing_val_file_is_repaired(corpus_file, tmp_path):
    cache = str(tmp_path / 'cache')
    folder, _ = data.prepare_text(str(corpus_file), cache)
    good_val = read_split(folder)[1]
    os.remove(os.path.join(folder, 'val.bin'))
    data.prepare_text(str(corpus_file), cache)
    np.testing.assert_array_equal(read_split(folder)[1], good_val)


def _empty(p):
    p.write_bytes(b'')


def _directory(p):
    p.mkdir()


def _not_utf8(p):
    p.write_bytes(b'\xff\xfe\x00abc')


def _missing(p):
    pass


@pytest.mark.parametrize('make, words', [(_missing, 'no such file'), (_directory, 'directory'), (_empty, 'empty'),
                                         (_not_utf8, 'UTF-8')])
def test_prepare_text_errors(tmp_path, make, words):
    path = tmp_path / 'dataset.txt'
    make(path)
    cache = tmp_path / 'cache'
    with pytest.raises(UserError) as e:
        data.prepare_text(str(path), str(cache))
    assert str(path) in str(e.value) and words in str(e.value)
    assert not cache.exists()


# -----------------------------------------------------------------------------
# WindowSampler
# -----------------------------------------------------------------------------

def test_sampler_epoch_covers_distinct_indices():
    n, batch = 23, 4
    s = data.WindowSampler(n, batch, seed=0)
    per_epoch = n // batch
    epoch0 = [s.next() for _ in range(per_epoch)]
    assert s.state_dict() == {'epoch': 0, 'cursor': per_epoch * batch}
    flat0 = np.concatenate(epoch0)
    assert all(len(b) == batch for b in epoch0)
    assert len(set(flat0.tolist())) == per_epoch * batch and flat0.min() >= 0 and flat0.max() < n
    epoch1 = [s.next() for _ in range(per_epoch)]
    assert s.state_dict() == {'epoch': 1, 'cursor': per_epoch * batch}
    flat1 = np.concatenate(epoch1)
    assert len(set(flat1.tolist())) == per_epoch * batch
    assert flat0.tolist() != flat1.tolist()


def test_sampler_is_deterministic_in_seed():
    a = [data.WindowSampler(50, 5, seed=3).next().tolist() for _ in range(2)]
    assert a[0] == a[1]
    b = data.WindowSampler(50, 5, seed=4).next().tolist()
    assert b != a[0]


def test_sampler_ranks_are_disjoint():
    n, batch = 24, 3
    ranks = [data.WindowSampler(n, batch, seed=7, rank=r, world_size=2) for r in range(2)]
    per_epoch = n // 2 // batch
    for epoch in range(2):
        seen = [np.concatenate([r.next() for _ in range(per_epoch)]).tolist() for r in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))
        assert [r.state_dict() for r in ranks] == [{'epoch': epoch, 'cursor': per_epoch * batch}] * 2


def test_sampler_ranks_stay_in_step_when_n_not_divisible():
    n, batch, world = 5, 1, 2
    ranks = [data.WindowSampler(n, batch, seed=0, rank=r, world_size=world) for r in range(world)]
    for step in range(6):
        batches = [r.next() for r in ranks]
        assert not set(batches[0].tolist()) & set(batches[1].tolist()), step
        assert ranks[0].state_dict() == ranks[1].state_dict(), step


@pytest.mark.parametrize('k', [0, 1, 3, 4, 7])
def test_sampler_resume_equals_continuing(k):
    n, batch = 10, 3  # 3 batches per epoch, 1 window dropped
    original = data.WindowSampler(n, batch, seed=11)
    for _ in range(k):
        original.next()
    state = json.loads(json.dumps(original.state_dict()))  # it travels through a checkpoint
    resumed = data.WindowSampler(n, batch, seed=11)
    resumed.load_state_dict(state)
    for _ in range(8):
        np.testing.assert_array_equal(resumed.next(), original.next())
    assert resumed.state_dict() == original.state_dict()


def test_sampler_resume_rank_shard():
    original = data.WindowSampler(20, 2, seed=5, rank=1, world_size=2)
    for _ in range(6):
        original.next()
    resumed = data.WindowSampler(20, 2, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(original.state_dict())
    for _ in range(6):
        np.testing.assert_array_equal(resumed.next(), original.next())


@pytest.mark.parametrize('n, batch, world', [(1, 4, 2), (0, 1, 1)])
def test_sampler_with_fewer_items_than_ranks_is_an_error(n, batch, world):
    with pytest.raises(UserError) as e:
        data.WindowSampler(n, batch, seed=0, rank=0, world_size=world)
    assert f"{n} training windows/clips cannot give each of {world} ranks one" in str(e.value)


@pytest.mark.parametrize('n, batch, world, expected', [(3, 4, 1, 3), (7, 4, 2, 3), (48, 64, 1, 48), (5, 8, 2, 2)])
def test_sampler_smaller_than_a_batch_trains_on_the_largest_batch_every_rank_fills(n, batch, world, expected):
    """DataLoader's default trains on a partial batch; under DDP each rank takes n // world items (equal steps)."""
    samplers = [data.WindowSampler(n, batch, seed=0, rank=r, world_size=world) for r in range(world)]
    batches = [s.next() for s in samplers]
    assert all(s.batch_size == expected for s in samplers) and all(len(b) == expected for b in batches)
    assert len(set(np.concatenate(batches).tolist())) == expected * world  # the ranks' shards never overlap
    again = [s.next() for s in samplers]  # the next epoch: the same size, another order
    assert all(len(b) == expected for b in again) and samplers[0].epoch == 1


@pytest.mark.parametrize('n, batch, world', [(4, 4, 1), (8, 4, 2), (9, 4, 2)])
def test_sampler_just_enough_windows(n, batch, world):
    for rank in range(world):
        b = data.WindowSampler(n, batch, seed=0, rank=rank, world_size=world).next()
        assert len(b) == batch


def test_prepare_text_repairs_corrupt_meta(tmp_path):
    """A corrupt meta.json (a kill mid-write on a filesystem without atomic rename, a hand edit) is re-prepared."""
    src = tmp_path / 'corpus.txt'
    src.write_text('print("hello")\n' * 500)
    folder, meta = data.prepare_text(str(src), str(tmp_path / "cache"))
    meta_path = os.path.join(folder, 'meta.json')
    with open(meta_path, 'w') as f:
        f.write('{"train_tokens": 12')  # truncated JSON
    folder2, meta2 = data.prepare_text(str(src), str(tmp_path / "cache"))
    assert folder2 == folder and meta2['train_tokens'] == meta['train_tokens']
    with open(meta_path) as f:
        assert json.load(f)['sha256'] == meta['sha256']


def test_sampler_length_buckets_cover_the_epoch_and_cut_padding():
    """With lengths, an epoch still visits distinct items (whole global batches), ranks stay disjoint, and the
    padding a batch needs (longest - mean length) is far below that of unsorted batches."""
    from data import WindowSampler
    lengths = np.random.default_rng(0).integers(20, 61, 1000)
    plain, bucketed = WindowSampler(1000, 32, 7), WindowSampler(1000, 32, 7, lengths=lengths)
    n_batches = 1000 // 32

    def waste(sampler):
        return np.mean([lengths[b].max() - lengths[b].mean() for b in (sampler.next() for _ in range(n_batches))])
    assert waste(bucketed) < 0.25 * waste(plain)
    fresh = WindowSampler(1000, 32, 7, lengths=lengths)
    epoch = np.concatenate([fresh.next() for _ in range(n_batches)])
    assert len(set(epoch.tolist())) == len(epoch) == n_batches * 32
    ranks = [WindowSampler(1000, 16, 7, rank=r, world_size=2, lengths=lengths) for r in (0, 1)]
    a, b = (np.concatenate([s.next() for _ in range(1000 // 32)]) for s in ranks)
    assert not set(a.tolist()) & set(b.tolist())
