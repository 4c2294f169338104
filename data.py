"""
Every data format the scripts read, and the built-in data they fall back on. One banner per family.
Prepared data goes to cache/, keyed by a hash of what produced it (source files by content, or by path, size and
modification time), written atomically, with checksums of its own files verified before every reuse. No data file
can run code: npz members are read with pickling off, dSprites' pickled metadata through a restricted unpickler.
"""
import ast
import codecs
import contextlib
import csv
import functools
import glob
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import sysconfig
import time
import wave
import zipfile
import zlib

import h5py
import numpy as np
import torch

from common import UserError, progress, write_atomic

# -----------------------------------------------------------------------------
# text: ASCII character tokenizer, corpora, token cache, windows and a resumable batch sampler
# -----------------------------------------------------------------------------

PAD, UNK = 0, 1


class CharTokenizer:
    """<PAD>=0, <UNK>=1, then printable ASCII 32..126, '\\n', '\\t': 99 ids in a fixed order. Anything else -> UNK.
    Swappable for a BPE tokenizer with the same methods; its dict is stored in checkpoints."""

    def __init__(self, chars=None):
        self.chars = chars or [chr(c) for c in range(32, 127)] + ['\n', '\t']
        self.vocab_size = 2 + len(self.chars)
        self.stoi = {ch: i + 2 for i, ch in enumerate(self.chars)}
        # code point -> id lookup for code points < 128 (everything above is UNK): encodes 8 MB in ~0.1 s
        self._table = np.full(128, UNK, dtype=np.uint8)
        for ch, i in self.stoi.items():
            self._table[ord(ch)] = i

    def encode_array(self, text):
        codes = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)  # lone surrogates -> UNK
        return np.where(codes < 128, self._table[np.minimum(codes, 127)], UNK).astype(np.uint8)

    def encode(self, text):
        return self.encode_array(text).tolist()

    def decode(self, ids):
        return ''.join('' if i == PAD else '\ufffd' if i == UNK else self.chars[i - 2] for i in ids)

    def to_dict(self):
        return {'kind': 'char', 'chars': ''.join(self.chars)}

    @classmethod
    def from_dict(cls, d):
        return cls(list(d['chars']))


def stdlib_corpus(max_chars=8_000_000):
    """The running Python's standard-library .py sources, sorted by path, tests and site-packages skipped,
    concatenated up to max_chars. Returns (text, provenance)."""
    root = sysconfig.get_paths()['stdlib']
    skipped = {'site-packages', 'test', 'tests', 'idle_test'}
    paths = sorted(p for p in glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
                   if not skipped & set(os.path.relpath(p, root).split(os.sep)))
    parts, size = [], 0
    for p in paths:
        try:
            with open(p, encoding='utf-8') as f:
                parts.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are not UTF-8: skip, deterministically
        size += len(parts[-1]) + 1
        if size >= max_chars:
            break
    text = '\n'.join(parts)[:max_chars]
    return text, {'source': f'python{sys.version_info[0]}.{sys.version_info[1]} stdlib ({len(parts)} files)'}


def read_text_file(path):
    if not os.path.exists(path):
        raise UserError(f"dataset {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"dataset {path} is a directory; expected one UTF-8 text file")
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"dataset {path}: cannot read it ({e.strerror})") from None
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise UserError(f"dataset {path} is not UTF-8 text (line {line}, byte {e.start}: {raw[e.start:e.start + 1]!r}; "
                        f"Latin-1 or UTF-16? save it as UTF-8)") from None
    if not text:
        raise UserError(f"dataset {path} is empty")
    return text, {'source': os.path.abspath(path)}


def prepare_text(dataset, cache_dir, val_fraction=0.05, log=print):
    """Tokenize a corpus once into cache_dir/slm/<sha>/{train,val}.bin (uint8) + meta.json.
    dataset='' means the stdlib corpus. Re-prepared whenever the source text changes (the key is its sha256), and
    when a token file no longer has the sha256 meta.json recorded (one log line says why). meta holds chars,
    unk_count and unk_top (the commonest characters mapped to <UNK>, with counts): enough to warn about a text the
    ASCII tokenizer does not fit."""
    text, provenance = stdlib_corpus() if not dataset else read_text_file(dataset)
    text = text.replace('\r\n', '\n')  # Windows line endings would otherwise become UNK + '\n'
    tokenizer = CharTokenizer()
    sha = hashlib.sha256(text.encode('utf-8')).hexdigest()
    key = hashlib.sha256(json.dumps([sha, tokenizer.to_dict(), val_fraction]).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, 'slm', key)
    meta_path = os.path.join(folder, 'meta.json')
    meta, problem = read_cache_meta(meta_path)
    if meta:
        return folder, dict(meta, **provenance)  # the same text may come from another path this time
    if problem:
        log(f"token cache {folder}: prepared again: {problem}")
    ids = tokenizer.encode_array(text)
    n_train = int(len(ids) * (1 - val_fraction))  # contiguous split: no leakage between neighbouring windows
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f'{split}.bin') for split in ('train', 'val')]
    write_atomic(paths[0], ids[:n_train].tobytes())
    write_atomic(paths[1], ids[n_train:].tobytes())
    unk = ids == UNK  # which code points became <UNK>, commonest first: what a warning can name
    codes, counts = np.unique(np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), np.uint32)[unk],
                              return_counts=True)
    unk_top = [[chr(codes[i]), int(counts[i])] for i in np.argsort(-counts, kind='stable')[:5]]
    meta = dict(provenance, sha256=sha, chars=len(text), unk_count=int(unk.sum()), unk_top=unk_top, dtype='uint8',
                train_tokens=n_train, val_tokens=len(ids) - n_train, tokenizer=tokenizer.to_dict())
    return folder, write_cache_meta(meta_path, paths, **meta)  # written last: its presence marks completeness


def window_starts(n_tokens, block_size, stride):
    """Start offsets of every (input, target) window: x = tokens[s:s+block_size], y = tokens[s+1:s+block_size+1]."""
    return np.arange(0, max(n_tokens - block_size, 0), stride, dtype=np.int64)


def get_batch(path, starts, block_size):
    """Read the windows at `starts` from a token file. The memmap is re-opened per batch so resident memory
    never grows with iterations (numpy keeps touched pages of a long-lived memmap mapped)."""
    tokens = np.memmap(path, dtype=np.uint8, mode='r')
    rows = tokens[starts[:, None] + np.arange(block_size + 1)]  # (B, block_size+1)
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


class WindowSampler:
    """Shuffled batches of window indices, epoch after epoch; each rank takes its own shard of every epoch's
    permutation. The state is (epoch, cursor): saved in checkpoints so a resumed run replays nothing."""

    def __init__(self, n_windows, batch_size, seed, rank=0, world_size=1, lengths=None):
        if n_windows < world_size:
            raise UserError(f"{n_windows} training windows/clips cannot give each of {world_size} ranks one: use more "
                            f"data (or a smaller block_size) or fewer ranks")
        batch_size = min(batch_size, n_windows // world_size)  # a split smaller than a batch trains on what it has
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n_windows, batch_size, seed, rank, world_size
        self.lengths = None if lengths is None else np.asarray(lengths)  # given: batch items of similar length
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # same permutation on every rank
        order = torch.randperm(self.n, generator=g).numpy()
        if self.lengths is not None:  # sort pools of 16 global batches by length, cut them, shuffle the batches
            step = self.batch_size * self.world_size
            pools = [p[np.argsort(self.lengths[p], kind='stable')] for p in np.split(order, range(16 * step, self.n,
                                                                                                  16 * step))]
            batches = np.concatenate(pools)[:self.n // step * step].reshape(-1, step)  # (global batches, step)
            order = batches[torch.randperm(len(batches), generator=g).numpy()].reshape(-1)
        per_rank = len(order) // self.world_size  # equal shards, so every rank starts each epoch at the same step
        return order[:per_rank * self.world_size][self.rank::self.world_size]

    def next(self):
        if self._order is None:
            self._order = self._epoch_order()
        if self.cursor + self.batch_size > len(self._order):  # drop the ragged tail, start the next epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        batch = self._order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self):
        return {'epoch': self.epoch, 'cursor': self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor, self._order = state['epoch'], state['cursor'], None


# -----------------------------------------------------------------------------
# pose (train_spoter.py): SPOTER CSV, HDF5 cache, procedural signs
# -----------------------------------------------------------------------------

SPOTER_BODY = ['nose', 'neck', 'rightEye', 'leftEye', 'rightEar', 'leftEar', 'rightShoulder', 'leftShoulder',
               'rightElbow', 'leftElbow', 'rightWrist', 'leftWrist']
SPOTER_HAND_JOINTS = ['wrist', 'indexTip', 'indexDIP', 'indexPIP', 'indexMCP', 'middleTip', 'middleDIP', 'middlePIP',
                      'middleMCP', 'ringTip', 'ringDIP', 'ringPIP', 'ringMCP', 'littleTip', 'littleDIP', 'littlePIP',
                      'littleMCP', 'thumbTip', 'thumbIP', 'thumbMP', 'thumbCMC']
# tensor order (T, 54, 2): body 12, hand 0 (`_left` columns), hand 1 (`_right` columns); CSV columns add _X / _Y
SPOTER_LANDMARKS = SPOTER_BODY + [f'{j}_left' for j in SPOTER_HAND_JOINTS] + [f'{j}_right' for j in SPOTER_HAND_JOINTS]
SPOTER_COLUMNS = [f'{stem}_{axis}' for stem in SPOTER_LANDMARKS for axis in 'XY']
_NUMBER_TYPES = {int, float}
csv.field_size_limit(2**30)  # one cell holds a whole video's track: long clips exceed csv's 128 KiB default


def _landmark_set(column):
    """Which landmark set a CSV column belongs to, for error messages."""
    stem = column[:-2]
    if stem in SPOTER_BODY:
        return 'body landmarks'
    return 'hand 0 joints (<joint>_left_X/Y)' if stem.endswith('_left') else 'hand 1 joints (<joint>_right_X/Y)'


def _parse_track(text):
    """'[0.5, 0.25]' -> [0.5, 0.25], or None if the cell is not a list of numbers. Exact: both parsers round
    correctly. json is ~10x faster than literal_eval, which reads what json refuses but Python writes ('[.5]')."""
    try:
        values = json.loads(text)
    except ValueError:
        try:
            values = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    # bools are ints to Python and strings would pass np.array: accept only plain numbers
    if type(values) is not list or not set(map(type, values)) <= _NUMBER_TYPES:
        return None
    return values


def _spoter_header(path, header):
    """Column name -> index for `labels` and every landmark column; a missing one is an error naming it."""
    index = {name.strip(): i for i, name in reversed(list(enumerate(header)))}  # first occurrence wins
    if 'labels' not in index:
        raise UserError(f"{path}: row 0 (header): no 'labels' column; a SPOTER CSV has one integer class label per row")
    missing = [c for c in SPOTER_COLUMNS if c not in index]
    if missing:
        raise UserError(f"{path}: row 0 (header): column '{missing[0]}' is missing (one of the "
                        f"{_landmark_set(missing[0])}; {len(missing)} of the {len(SPOTER_COLUMNS)} landmark columns "
                        f"are missing)")
    return index['labels'], [index[c] for c in SPOTER_COLUMNS]


def _spoter_label(path, row_number, text):
    """An integer label; '3.0' (how some tools write ints) is accepted, '3.5' or 'sign' is not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value.is_integer():
        raise UserError(f"{path}: row {row_number}, column labels: {text[:40]!r} is not an integer class label")
    return int(value)


def _spoter_clip(path, row_number, row, columns):
    """One CSV row's 108 landmark cells -> (T, 54, 2) float32, every cell checked."""
    tracks = []
    for name, i in zip(SPOTER_COLUMNS, columns):
        track = _parse_track(row[i])
        if track is None:
            raise UserError(f"{path}: row {row_number}, column {name}: expected a list of numbers such as "
                            f"[0.5, 0.25], got {row[i][:40]!r}")
        if len(track) != len(tracks[0] if tracks else track):  # every column of a row is the same video
            raise UserError(f"{path}: row {row_number}: column {name} has {len(track)} frames but column "
                            f"{SPOTER_COLUMNS[0]} has {len(tracks[0])}; every landmark column needs the same count")
        tracks.append(track)
    values = np.array(tracks, dtype=np.float64)  # (108, T): _X, _Y per landmark
    if not np.isfinite(values).all():  # json accepts NaN/Infinity; they would only surface later as a NaN loss
        name = SPOTER_COLUMNS[int(np.nonzero(~np.isfinite(values).all(1))[0][0])]
        raise UserError(f"{path}: row {row_number}, column {name}: contains a NaN or infinite value")
    outside = (values < 0) | (values > 1)  # 0 is the missing-joint marker; pixel coordinates run into the hundreds
    if outside.any():
        track, frame = np.argwhere(outside)[0]
        raise UserError(f"{path}: row {row_number}, column {SPOTER_COLUMNS[track]}: {values[track, frame]:g} (frame "
                        f"{frame}) is outside [0, 1]; expected coordinates normalized by the frame size (0 = missing "
                        f"joint), not pixels")
    return values.astype(np.float32).reshape(54, 2, -1).transpose(2, 0, 1).copy()  # (T, 54, 2)


def _utf8_error(path, where, header_row):
    """The UserError for a CSV that is not UTF-8: the row (the header being row `header_row`) and offset of its
    first invalid byte. The file is decoded whole here, on the error path only, so the row is exact."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        raw.decode('utf-8')
    except UnicodeDecodeError as e:
        row = header_row + raw.count(b'\n', 0, e.start)
        return UserError(f"{where}: row {row}: not a readable UTF-8 CSV (byte {e.start} is {raw[e.start:e.start + 1]!r}:"
                         f" Latin-1 or UTF-16? save it as UTF-8)")
    return UserError(f"{where}: not a readable UTF-8 CSV")


def read_spoter_csv(path):
    """Read a SPOTER CSV: one row per video, `labels` plus `<landmark>_X/_Y` cells of per-frame lists.
    Returns (clips: list of (T, 54, 2) float32 with values as in the file (Y up, 0 = missing), labels: int64 raw,
    skipped: rows with no landmark in any frame, dropped). Extra columns (root_X, video_fps, ...) are ignored.
    Every coordinate must be finite and in [0, 1] (0 marks a missing joint)."""
    if not os.path.isfile(path):
        raise UserError(f"pose CSV {path}: no such file" + (" (it is a directory)" if os.path.isdir(path) else ""))
    clips, labels, skipped, row_number = [], [], 0, 0
    with open(path, newline='', encoding='utf-8-sig') as f:  # utf-8-sig: spreadsheet exports start with a BOM
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                raise UserError(f"pose CSV {path} is empty: expected a header of 'labels' and <landmark>_X/_Y")
            label_column, columns = _spoter_header(path, header)
            for row_number, row in progress(enumerate(reader, start=1), f"pose CSV {path}: rows"):
                if not row:
                    continue  # a blank line (often the last one); row numbers still count it, like a line number
                if len(row) != len(header):
                    raise UserError(f"{path}: row {row_number} has {len(row)} fields but the header has {len(header)}")
                label = _spoter_label(path, row_number, row[label_column].strip())
                clip = _spoter_clip(path, row_number, row, columns)
                if not clip.any():  # no pose detected in any frame: nothing to learn from (real datasets have a few)
                    skipped += 1
                    continue
                clips.append(clip)
                labels.append(label)
        except UnicodeDecodeError:  # a binary, Latin-1 or UTF-16 file
            raise _utf8_error(path, str(path), 0) from None
        except csv.Error as e:  # a NUL byte, an unclosed quote
            raise UserError(f"{path}: row {row_number + 1}: not a readable CSV ({e})") from None
    if not clips:
        why = f"all {skipped} rows have no landmark in any frame" if skipped else "a header but no data rows"
        raise UserError(f"pose CSV {path} has {why}")
    return clips, np.array(labels, dtype=np.int64), skipped


def _csv_label_row(path, label, index):
    """'row N' (data rows from 1) of the first row of SPOTER CSV `path` labelled `label`, for messages (the pose
    cache keeps no row numbers); 'row {index + 1} of the kept rows' where the file cannot tell."""
    with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error, StopIteration, ValueError):
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.reader(f)
            column = [name.strip() for name in next(reader)].index('labels')
            for number, row in enumerate(reader, start=1):
                with contextlib.suppress(ValueError, IndexError):  # blank lines, bad cells: not this row
                    if float(row[column]) == label:
                        return f"row {number}"
    return f"row {index + 1} of the kept rows"


def resolve_label_offset(labels, label_offset, num_classes, path):
    """Make labels 0-based. 'auto': smallest label 1 -> subtract 1 (the original's convention), 0 -> keep, else an
    error; an int -> subtract it. Resolve on the training set and pass the resulting int for val/test, whose
    smallest class may be absent. 'auto' with num_classes None is that training file, whose largest label sets
    the class count, so its labels must also be dense (0..C-1 or 1..C): the classes may not outnumber twice the
    distinct labels (more than half the ids unused), which stops a typo such as 100000 among 0..99 from making
    100,001 classes. Errors name the CSV row. Returns (labels_zero_based, offset)."""
    labels = np.asarray(labels, dtype=np.int64)
    if label_offset == 'auto':
        smallest = int(labels.min()) if len(labels) else 0
        if smallest not in (0, 1):
            raise UserError(f"{path}: label_offset='auto' cannot tell the label base: the smallest label is {smallest} "
                            f"(expected 0 for 0-based or 1 for 1-based labels); set label_offset to an int")
        offset = smallest
    elif isinstance(label_offset, int) and not isinstance(label_offset, bool):
        offset = label_offset
    else:
        raise UserError(f"label_offset={label_offset!r}: expected 'auto' or an int")
    shifted = labels - offset
    bad = (shifted < 0) | (shifted >= num_classes if num_classes is not None else False)
    if bad.any():
        first = int(np.nonzero(bad)[0][0])
        valid = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise UserError(f"{path}: label {int(labels[first])} ({_csv_label_row(path, labels[first], first)}) minus "
                        f"label_offset {offset} is {int(shifted[first])}, outside the valid range {valid} "
                        f"({int(bad.sum())} labels out of range; check label_offset and num_classes)")
    n_used = len(np.unique(shifted))
    if label_offset == 'auto' and num_classes is None and len(labels) and shifted.max() + 1 > 2 * n_used:
        first = int(np.argmax(shifted >= 2 * n_used))  # the first label past twice the distinct count: the outlier
        raise UserError(f"{path}: {_csv_label_row(path, labels[first], first)}: label {int(labels[first])} would make "
                        f"{int(shifted.max()) + 1:,} classes for {n_used} distinct labels (more than half unused); "
                        f"labels must be dense, 0..C-1 or 1..C: fix it (a typo?), remap the labels, or set num_classes")
    return shifted, offset


def write_spoter_csv(path, clips, labels):
    """Write clips (T, 54, 2) and labels in the SPOTER CSV format, atomically. Cells are list literals of each
    value's shortest float32 text, which parses back to the identical float32."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(['labels'] + SPOTER_COLUMNS)
    for clip, label in zip(clips, labels, strict=True):
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 3 or clip.shape[1:] != (54, 2):
            raise ValueError(f"write_spoter_csv: clip of shape {clip.shape}, expected (T, 54, 2)")
        tracks = clip.transpose(1, 2, 0).reshape(108, -1)  # (108, T): _X, _Y per landmark
        writer.writerow([int(label)] + ['[' + ', '.join(map(str, track)) + ']' for track in tracks])
    write_atomic(path, text.getvalue().encode('utf-8'))


def file_sha256(path):
    """sha256 hex of a file's bytes, read in 1 MiB chunks (~1.7 GB/s with the SHA CPU extensions)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _arrays_sha256(*arrays):
    """sha256 hex of arrays' bytes in C order: the checksum an HDF5 cache records of its own datasets."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def write_cache_meta(meta_path, files, **fields):
    """Write meta_path (JSON, atomically) with `fields` and the sha256 of each of `files` (cache files in its folder
    or below); write it last, so that its presence marks the cache complete. Returns what it wrote."""
    folder = os.path.dirname(meta_path)
    meta = dict(fields, checksums={os.path.relpath(p, folder): file_sha256(p) for p in files})
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return meta


def read_cache_meta(meta_path, **expected):
    """-> (meta, None) when the cache meta_path describes can be reused; (None, None) when there is none (never
    built, or interrupted before its end); (None, why not) when meta_path is unreadable, records other `expected`
    fields (the recipe), or a file it lists is missing or fails its sha256 (changed since, same-size garbage too)."""
    if not os.path.exists(meta_path):
        return None, None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        checksums = dict(meta['checksums'])
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{os.path.basename(meta_path)} is unreadable or records no checksums (an older version wrote it?)"
    changed = next((key for key, value in expected.items() if meta.get(key) != value), None)
    if changed:
        return None, f"it was made with another {changed}"
    for name, digest in checksums.items():
        try:
            if file_sha256(os.path.join(os.path.dirname(meta_path), name)) != digest:
                return None, f"{name} fails its sha256 check (it changed after it was written)"
        except OSError as e:
            return None, f"{name} cannot be read ({e.strerror})"
    return meta, None


@contextlib.contextmanager
def replaced_when_done(path, tmp):
    """Write to tmp inside the block; on success tmp is renamed over path, on any failure (or kill signal turned
    exception) it is removed, so path only ever holds a complete file and the previous one survives a failure."""
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_pose_cache(h5_path, sha256=None):
    """-> ((frames, offsets, labels, skipped), None) from a usable HDF5 pose cache, else (None, why not): unreadable,
    incomplete, made from another CSV (sha256), inconsistent, or failing the checksum of its arrays."""
    try:
        with h5py.File(h5_path, 'r') as f:
            if not f.attrs.get('complete', False):
                return None, "it is incomplete (no complete=True attribute)"
            if sha256 is not None and f.attrs.get('sha256') != sha256:
                return None, "it was made from another version of the CSV"
            frames, offsets, labels = (f[k][()] for k in ('frames', 'offsets', 'labels'))
            skipped, checksum = int(f.attrs['skipped']), f.attrs.get('checksum')
    except (OSError, KeyError, ValueError, TypeError) as e:  # truncated or foreign file: h5py raises OSError
        return None, f"it cannot be read ({type(e).__name__})"
    if frames.shape[1:] != (54, 2) or offsets.shape != (labels.shape[0] + 1,):
        return None, f"its shapes disagree: frames {frames.shape}, offsets {offsets.shape}, labels {labels.shape}"
    if offsets[0] != 0 or offsets[-1] != frames.shape[0] or (np.diff(offsets) < 0).any():
        return None, "its offsets do not index its frames"
    if checksum != _arrays_sha256(frames, offsets, labels):  # 20 ms for WLASL100's ~50 MB
        return None, "its arrays fail their sha256 check (changed after it was written, or an older version's)"
    return (frames, offsets, labels, skipped), None


def pose_cache(csv_path, cache_dir, log=print):
    """Convert a SPOTER CSV once into cache_dir/spoter/<sha256[:16]>.h5 (ragged: all frames concatenated, offsets,
    raw labels, the sha256 of those arrays) and return its path. Reused while it validates; a corrupt, partial or
    changed file is rebuilt, with one log line saying why."""
    if not os.path.isfile(csv_path):
        raise UserError(f"pose CSV {csv_path}: no such file")
    sha = file_sha256(csv_path)
    h5_path = os.path.join(cache_dir, 'spoter', f'{sha[:16]}.h5')  # keyed by content: an edited CSV gets a new cache
    if os.path.exists(h5_path):
        problem = _read_pose_cache(h5_path, sha)[1]
        if problem is None:
            return h5_path
        log(f"pose cache {h5_path}: rebuilt: {problem}")
    clips, labels, skipped = read_spoter_csv(csv_path)  # bad input stops here, before anything is written
    frames = np.concatenate(clips).astype(np.float32)  # (total_frames, 54, 2)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
    os.makedirs(os.path.dirname(h5_path), exist_ok=True)
    tmp = f'{h5_path}.tmp{os.getpid()}'  # per-process name: DDP ranks preparing at once never share a file
    with replaced_when_done(h5_path, tmp), h5py.File(tmp, 'w') as f:
        f.create_dataset('frames', data=frames)
        f.create_dataset('offsets', data=offsets)  # clip i = frames[offsets[i]:offsets[i+1]]
        f.create_dataset('labels', data=labels)
        f.attrs.update(source=os.path.abspath(csv_path), sha256=sha, skipped=skipped,
                       checksum=_arrays_sha256(frames, offsets, labels))
        f.attrs['complete'] = True  # last: a file without it was interrupted
    return h5_path


def load_pose_cache(h5_path):
    """Read a pose cache fully into memory (WLASL100 is ~2k clips), checksum verified. Returns (frames (N, 54, 2)
    float32, offsets (n_clips + 1,) int64, labels (n_clips,) int64 raw, skipped)."""
    arrays, problem = _read_pose_cache(h5_path)
    if problem:
        raise UserError(f"pose cache {h5_path} is not usable: {problem}; delete it to rebuild it from the CSV")
    return arrays


def pad_clips(clips, indices):
    """Pad the chosen (T, 54, 2) clips to the longest: poses (B, T, 54, 2) and pad_mask (B, T), True at padding."""
    longest = max(len(clips[i]) for i in indices)
    poses = torch.zeros(len(indices), longest, 54, 2)
    pad_mask = torch.ones(len(indices), longest, dtype=torch.bool)
    for row, i in enumerate(indices):
        poses[row, :len(clips[i])] = torch.from_numpy(clips[i])
        pad_mask[row, :len(clips[i])] = False
    return poses, pad_mask


def gather_clips(frames, offsets, indices):
    """pad_clips for clips stored end to end (a pose cache's arrays): frames (F, 54, 2) on any device, offsets
    (n_clips + 1,) int64 numpy. One gather on frames' device, so on a GPU the batch is never built on the host:
    poses (B, T, 54, 2) and pad_mask (B, T), equal to pad_clips' bit for bit."""
    indices = np.asarray(indices)
    starts, lengths = offsets[indices], offsets[indices + 1] - offsets[indices]
    steps = torch.arange(int(lengths.max()), device=frames.device)  # (T,)
    starts, lengths = (torch.from_numpy(a).to(frames.device, non_blocking=True) for a in (starts, lengths))
    pad_mask = steps[None] >= lengths[:, None]  # (B, T)
    rows = (starts[:, None] + steps[None]).clamp_max(len(frames) - 1)  # (B, T) frame of each slot (any, at padding)
    return frames[rows].masked_fill(pad_mask[..., None, None], 0.0), pad_mask  # (B, T, 54, 2), padding zeroed


# -----------------------------------------------------------------------------
# pose transforms (train_spoter.py): body/hand normalization and the four augmentations, batched in torch
# -----------------------------------------------------------------------------
# SPOTER pose transforms (Bohacek & Hruz, WACV-W 2022): body and hand normalization, and the four training
# augmentations, batched in torch over a padded batch on any device. The formulas are those of
# the project's SPOTER spec, sections "Normalization" and "Augmentations".
#
# Layout: poses (B, T, 54, 2) raw CSV coordinates in [0, 1], Y up; a point is missing when its x == 0.
# Landmarks: 12 body joints (SPOTER_BODY), then hand 0 and hand 1, 21 joints each (SPOTER_HAND_JOINTS).
# pad_mask (B, T) bool is True at padding frames (always at the end of a clip); they come out as zeros and never
# influence real frames.
# Decisions where the spec is silent:
# - a body box of zero width or height (hm = 0, e.g. both shoulders at the same point) leaves that frame's body
#   joints raw, like a frame without a box; it still counts as the "previous box" for later frames;
# - a hand whose present joints all coincide (w = h = 0, e.g. a single present joint) stays raw;
# - the hand box is taken over the joints with x != 0 (y == 0 of such a joint counts as a coordinate);
# - augmentations restore every missing point exactly as it went in (x == 0 stays 0);
# - arm joint rotate: a pivot missing in a frame (x == 0) rotates nothing in that frame;
# - angles are in degrees everywhere in this file; positive = counter-clockwise in the Y-up frame.
N_BODY, N_HAND = len(SPOTER_BODY), len(SPOTER_HAND_JOINTS)
N_LANDMARKS = N_BODY + 2 * N_HAND  # 54
(NOSE, NECK, R_EYE, L_EYE, R_EAR, L_EAR, R_SHOULDER, L_SHOULDER,
 R_ELBOW, L_ELBOW, R_WRIST, L_WRIST) = range(N_BODY)
ARM_CHAINS = ((NECK, R_SHOULDER, R_ELBOW, R_WRIST),  # side 0: right arm
              (NECK, L_SHOULDER, L_ELBOW, L_WRIST))  # side 1: left arm
assert (R_SHOULDER, L_SHOULDER, R_ELBOW, L_ELBOW, R_WRIST, L_WRIST) == tuple(range(6, 12))  # arm_rotate relies on it
UNIT_SQUARE = ((0.0, 1.0), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0))  # the perspective's source corners, in this order

# augmentation ranges (the original's defaults)
ROTATE_DEGREES = 13.0
PERSPECTIVE_MAX_RATIO = 0.1
SQUEEZE_MAX_RATIO = 0.15
ARM_ROTATE_P, ARM_ROTATE_DEGREES = 0.3, 4.0
AUGMENT_P = 0.5


def _check_poses(poses):
    if poses.dim() != 4 or poses.shape[2:] != (N_LANDMARKS, 2):
        raise ValueError(f"poses of shape {tuple(poses.shape)}: expected (B, T, {N_LANDMARKS}, 2)")


def _zero_padding(poses, pad_mask):
    """Padding frames -> 0, so that garbage in them never reaches the model's inputs as NaN or inf."""
    if pad_mask is None:
        return poses
    return poses.masked_fill(pad_mask[:, :, None, None].to(poses.device), 0.0)


def _safe(denominator, usable):
    """The denominator where it will be used, 1 elsewhere: no inf/NaN even in the branch torch.where drops."""
    return torch.where(usable, denominator, torch.ones_like(denominator))


# -----------------------------------------------------------------------------
# normalization: body box per frame (with the previous-box rule), hand box per hand per frame, then -0.5
# -----------------------------------------------------------------------------


def body_boxes(poses, pad_mask=None):
    """The body box of every frame: (start_x, start_y, end_x, end_y) (B, T, 4) and has_box (B, T) bool.
    hm = |leftShoulder - rightShoulder|, or |neck - nose| when a shoulder is missing;
    start = (neck_x - 3hm, leftEye_y + hm), end = (neck_x + 3hm, start_y - 6hm), negatives clamped to 0.
    A frame with (a shoulder missing) and (neck or nose missing) reuses the most recent earlier frame's box;
    before any box, has_box is False. Padding frames never provide a box."""
    x, y = poses[..., 0], poses[..., 1]  # (B, T, 54) each
    B, T = x.shape[:2]
    shoulders = (x[..., L_SHOULDER] != 0) & (x[..., R_SHOULDER] != 0)
    neck_nose = (x[..., NECK] != 0) & (x[..., NOSE] != 0)
    own_box = shoulders | neck_nose  # the frame can build its own box
    if pad_mask is not None:
        own_box = own_box & ~pad_mask.to(own_box.device)
    shoulder_width = (poses[..., L_SHOULDER, :] - poses[..., R_SHOULDER, :]).norm(dim=-1)
    neck_nose_length = (poses[..., NECK, :] - poses[..., NOSE, :]).norm(dim=-1)
    hm = torch.where(shoulders, shoulder_width, neck_nose_length)  # (B, T)
    start_x, start_y = x[..., NECK] - 3 * hm, y[..., L_EYE] + hm
    end_x, end_y = x[..., NECK] + 3 * hm, start_y - 6 * hm  # end_y from the unclamped start_y, as the original
    boxes = torch.stack([start_x, start_y, end_x, end_y], dim=-1).clamp(min=0)  # (B, T, 4)
    # previous-box rule without a loop over frames: the index of the most recent frame with its own box
    frame = torch.arange(T, device=x.device).expand(B, T)
    source = torch.where(own_box, frame, torch.full_like(frame, -1)).cummax(dim=1).values  # (B, T), -1 = none yet
    boxes = boxes.gather(1, source.clamp(min=0)[..., None].expand(B, T, 4))  # (B, T, 4)
    return boxes, source >= 0


def normalize_body(poses, pad_mask=None):
    """The 12 body joints (B, T, 12, 2) in their frame's body box, for joints with x != 0:
    x' = (x - start_x) / (end_x - start_x), y' = (y - end_y) / (start_y - end_y).
    Frames without a box (or with a zero-size one) keep their raw body joints."""
    boxes, has_box = body_boxes(poses, pad_mask)
    start_x, start_y, end_x, end_y = (c[..., None] for c in boxes.unbind(-1))  # (B, T, 1) each
    width, height = end_x - start_x, start_y - end_y
    usable = has_box[..., None] & (width != 0) & (height != 0)  # (B, T, 1)
    body = poses[:, :, :N_BODY]  # (B, T, 12, 2)
    x, y = body.unbind(-1)  # (B, T, 12) each
    normalized = torch.stack([(x - start_x) / _safe(width, usable),
                              (y - end_y) / _safe(height, usable)], dim=-1)  # (B, T, 12, 2)
    change = (usable & (x != 0))[..., None]  # missing joints stay as they are
    return torch.where(change, normalized, body)


def normalize_hands(poses):
    """Both hands (B, T, 42, 2), each hand in each frame in its own box over its joints with x != 0:
    w = max-min of x, h = max-min of y; w > h: dx = 0.1w, dy = dx + (w-h)/2, else dy = 0.1h, dx = dy + (h-w)/2;
    start = (min_x - dx, min_y - dy), end = (max_x + dx, max_y + dy);
    x' = (x - start_x) / (end_x - start_x), y' = (y - start_y) / (end_y - start_y).
    A hand with no present joint, or whose present joints coincide (w = h = 0), stays raw."""
    B, T = poses.shape[:2]
    hands = poses[:, :, N_BODY:].reshape(B, T, 2, N_HAND, 2)  # (B, T, hand, joint, xy)
    x, y = hands.unbind(-1)  # (B, T, 2, 21) each
    present = x != 0
    any_present = present.any(dim=-1)  # (B, T, 2)

    def extent(c):  # min and max over the present joints; 0 for an empty hand (it is left raw anyway)
        lo = torch.where(present, c, torch.full_like(c, math.inf)).amin(dim=-1)
        hi = torch.where(present, c, torch.full_like(c, -math.inf)).amax(dim=-1)
        zero = torch.zeros_like(lo)
        return torch.where(any_present, lo, zero), torch.where(any_present, hi, zero)  # (B, T, 2) each

    (min_x, max_x), (min_y, max_y) = extent(x), extent(y)
    w, h = max_x - min_x, max_y - min_y
    wide = w > h  # pad the shorter side so that the box is square
    dx = torch.where(wide, 0.1 * w, 0.1 * h + (h - w) / 2)
    dy = torch.where(wide, 0.1 * w + (w - h) / 2, 0.1 * h)
    start_x, start_y, end_x, end_y = min_x - dx, min_y - dy, max_x + dx, max_y + dy
    width, height = end_x - start_x, end_y - start_y
    usable = any_present & (width != 0) & (height != 0)  # (B, T, 2)
    normalized = torch.stack([(x - start_x[..., None]) / _safe(width, usable)[..., None],
                              (y - start_y[..., None]) / _safe(height, usable)[..., None]], dim=-1)  # (B,T,2,21,2)
    change = (usable[..., None] & present)[..., None]  # (B, T, 2, 21, 1)
    return torch.where(change, normalized, hands).reshape(B, T, 2 * N_HAND, 2)  # (B, T, 42, 2)


def normalize_poses(poses, pad_mask=None):
    """SPOTER's input normalization: body normalization, hand normalization, then every coordinate -= 0.5
    (missing points become -0.5). poses (B, T, 54, 2) raw (or one clip (T, 54, 2)) -> the same shape;
    padding frames (pad_mask True) come out as zeros."""
    if poses.dim() == 3:  # one clip, e.g. at inference
        return normalize_poses(poses[None], None if pad_mask is None else pad_mask[None])[0]
    _check_poses(poses)
    normalized = torch.cat([normalize_body(poses, pad_mask), normalize_hands(poses)], dim=2) - 0.5  # (B, T, 54, 2)
    return _zero_padding(normalized, pad_mask)


# -----------------------------------------------------------------------------
# augmentations: each takes per-clip parameters (B, ...) and keeps missing points exactly as they were.
# Rotate, perspective and squeeze are all planar homographies: one 3x3 matrix per clip (built on the CPU in
# float64 from the parameters) for the body and one for the hands, applied elementwise to the whole batch. The
# identity matrix leaves a point bit-exact (x*1 + y*0 + 0), so unaugmented clips come out unchanged.
# -----------------------------------------------------------------------------


def _cpu64(values):
    """A per-clip parameter as a CPU float64 tensor: the 3x3 matrices are tiny, exact enough in float64, and any
    device works afterwards (float64 or not)."""
    return torch.as_tensor(values).detach().to('cpu', torch.float64)


def _identity(batch_size):
    return torch.eye(3, dtype=torch.float64).expand(batch_size, 3, 3)


def rotation_homography(theta, center=(0.5, 0.5)):
    """(B, 3, 3) rotation by theta (B,) degrees about center: p' = c + R (p - c), R = [[cos, -sin], [sin, cos]],
    i.e. [[cos, -sin, cx - cos cx + sin cy], [sin, cos, cy - sin cx - cos cy], [0, 0, 1]]."""
    radians = _cpu64(theta) * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    cx, cy = center
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    rows = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zero, zero, one]
    return torch.stack(rows, dim=-1).view(-1, 3, 3)  # (B, 3, 3)


def squeeze_homography(ml, mr):
    """(B, 3, 3) horizontal squeeze x' = ml + x (1 - ml - mr), y' = y."""
    ml, mr = _cpu64(ml), _cpu64(mr)
    H = _identity(len(ml)).clone()
    H[:, 0, 0], H[:, 0, 2] = 1 - ml - mr, ml
    return H


def perspective_corners(r, flip):
    """Destination corners (B, 4, 2) of UNIT_SQUARE (0,1),(1,1),(0,0),(1,0) for ratios r (B,):
    flip True -> (r,1-r),(1,1),(r,r),(1,0) (left edge shrinks); False -> (0,1),(1-r,1-r),(0,0),(1-r,r)."""
    r = torch.as_tensor(r)
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    left = torch.stack([r, 1 - r, one, one, r, r, one, zero], dim=-1)  # (B, 8): x0 y0 x1 y1 ...
    right = torch.stack([zero, one, 1 - r, 1 - r, zero, zero, 1 - r, r], dim=-1)
    flip = torch.as_tensor(flip, device=r.device).bool()[:, None]  # (B, 1)
    return torch.where(flip, left, right).view(-1, 4, 2)  # (B, 4, 2)


def homography(src, dst):
    """The 3x3 homography H (B, 3, 3), H[2, 2] = 1, mapping the 4 points src (B, 4, 2) to dst (B, 4, 2): each pair
    (x, y) -> (u, v) gives u = (h0 x + h1 y + h2) / (h6 x + h7 y + 1), v = (h3 x + h4 y + h5) / (h6 x + h7 y + 1),
    i.e. two rows of an 8x8 linear system [x y 1 0 0 0 -ux -uy] h = u, [0 0 0 x y 1 -vx -vy] h = v."""
    x, y = src.unbind(-1)  # (B, 4) each
    u, v = dst.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)  # (B, 4, 8)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)  # (B, 4, 8)
    system = torch.cat([rows_u, rows_v], dim=1)  # (B, 8, 8)
    h = torch.linalg.solve(system, torch.cat([u, v], dim=1))  # (B, 8)
    return torch.cat([h, one[:, :1]], dim=1).view(-1, 3, 3)  # (B, 3, 3)


def perspective_homography(r, flip):
    """(B, 3, 3) homography taking UNIT_SQUARE to perspective_corners(r, flip)."""
    dst = perspective_corners(_cpu64(r), torch.as_tensor(flip).cpu())
    src = torch.tensor(UNIT_SQUARE, dtype=torch.float64).expand_as(dst)
    return homography(src, dst)


def apply_homography(points, H):
    """points (B, ..., 2) mapped by per-clip H (B, 3, 3): (u, v, w) = H [x, y, 1], result (u / w, v / w).
    Elementwise, not a matmul: a k=2 batched matmul is ~10x slower on CPU, and this keeps H = I bit-exact."""
    h = H.to(points.device, points.dtype).reshape(H.size(0), 9, *(1,) * (points.dim() - 2))  # (B, 9, 1, ..., 1)
    x, y = points[..., 0], points[..., 1]  # (B, ...) each
    w = h[:, 6] * x + h[:, 7] * y + h[:, 8]
    return torch.stack([(h[:, 0] * x + h[:, 1] * y + h[:, 2]) / w,
                        (h[:, 3] * x + h[:, 4] * y + h[:, 5]) / w], dim=-1)


def transform_joints(poses, body_H, hand_H):
    """Body joints through body_H, hand joints through hand_H (per clip, (B, 3, 3)); missing points kept."""
    moved = torch.cat([apply_homography(poses[:, :, :N_BODY], body_H),
                       apply_homography(poses[:, :, N_BODY:], hand_H)], dim=2)  # (B, T, 54, 2)
    return torch.where(poses[..., :1] == 0, poses, moved)  # missing points (x == 0) go back to their input


def rotate(poses, theta):
    """Augmentation 0: every joint (body and hands) rotated about (0.5, 0.5) by theta (B,) degrees per clip."""
    H = rotation_homography(theta)
    return transform_joints(poses, H, H)


def perspective(poses, r, flip):
    """Augmentation 1: the 12 body joints through the homography taking UNIT_SQUARE to perspective_corners(r, flip)
    (r (B,) in [0, 0.1], flip (B,) bool); hands unchanged."""
    return transform_joints(poses, perspective_homography(r, flip), _identity(poses.size(0)))


def squeeze(poses, ml, mr):
    """Augmentation 2: body joints squeezed horizontally, x' = ml + x (1 - ml - mr), ml, mr (B,) in [0, 0.15];
    y and hands unchanged."""
    return transform_joints(poses, squeeze_homography(ml, mr), _identity(poses.size(0)))


def rotate_about(points, pivot, cos, sin):
    """Rotate points (..., 2) about pivot (broadcastable) by the angle whose cos and sin are given (broadcastable
    to points[..., 0]): p' = pivot + R (p - pivot), R = [[cos, -sin], [sin, cos]]."""
    dx, dy = (points - pivot).unbind(-1)
    px, py = pivot.unbind(-1)
    return torch.stack([px + cos * dx - sin * dy, py + sin * dx + cos * dy], dim=-1)


def arm_rotate(poses, angles):
    """Augmentation 3: for each side s (0 right, 1 left) walk the chain [neck, shoulder, elbow, wrist]; at pivot k
    (0 neck, 1 shoulder, 2 elbow) rotate the later joints of the chain about the pivot's current position by
    angles[b, s, k] degrees (B, 2, 3; 0 = no rotation), pivot after pivot. Same angles in every frame of a clip.
    A pivot missing in a frame rotates nothing there; missing joints stay as they are."""
    B, T = poses.shape[:2]
    chains = torch.tensor(ARM_CHAINS, device=poses.device)  # (2, 4)
    arms = poses[:, :, chains]  # (B, T, side, 4, 2): a small copy, the loop works on it
    missing = arms[..., 0] == 0  # (B, T, 2, 4): from the input, so a point rotated onto x = 0 is not confused
    radians = torch.as_tensor(angles).to(poses.device, poses.dtype) * (math.pi / 180)  # (B, 2, 3)
    cos, sin = torch.cos(radians)[:, None, :, None], torch.sin(radians)[:, None, :, None]  # (B, 1, 2, 1, 3)
    for k in range(3):
        pivot, later = arms[:, :, :, k:k + 1], arms[:, :, :, k + 1:]  # (B, T, 2, 1, 2), (B, T, 2, 3 - k, 2)
        rotated = rotate_about(later, pivot, cos[..., k], sin[..., k])
        # unchanged: missing joints, joints whose pivot is missing, and pivots with angle 0 (exactly, not to 1 ulp)
        keep = missing[:, :, :, k + 1:] | missing[:, :, :, k:k + 1] | (radians[:, None, :, None, k] == 0)
        arms = torch.cat([arms[:, :, :, :k + 1], torch.where(keep[..., None], later, rotated)], dim=3)
    # (side, link) -> (link, side) is the body order rightShoulder, leftShoulder, rightElbow, ..., leftWrist = 6..11
    links = arms[:, :, :, 1:].transpose(2, 3).reshape(B, T, 6, 2)  # (B, T, 6, 2)
    return torch.cat([poses[:, :, :R_SHOULDER], links, poses[:, :, L_WRIST + 1:]], dim=2)


# -----------------------------------------------------------------------------
# random choice: with p 0.5 one of the four, uniformly, per clip; every random number from one CPU generator
# -----------------------------------------------------------------------------

AUGMENTATIONS = ('rotate', 'perspective', 'squeeze', 'arm_rotate')  # kind k = AUGMENTATIONS[k]; -1 = none


def sample_augmentation_params(batch_size, generator=None):
    """Per-clip random parameters, drawn on the CPU from `generator` in a fixed order (every parameter for every
    clip, whatever kind it gets, so a run is reproducible): kind (B,) int64 in -1..3 (-1 with p 1 - AUGMENT_P),
    theta (B,) ~ U(-13, 13) deg, r (B,) ~ U(0, 0.1), flip (B,) bool p 0.5, ml, mr (B,) ~ U(0, 0.15),
    arm_angles (B, 2, 3): U(-4, 4) deg with p 0.3 per pivot, else 0."""
    B = batch_size

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand((B, *shape), generator=generator)

    apply = uniform(0, 1) < AUGMENT_P
    kind = torch.randint(0, len(AUGMENTATIONS), (B,), generator=generator)
    params = {'kind': torch.where(apply, kind, torch.full_like(kind, -1)),
              'theta': uniform(-ROTATE_DEGREES, ROTATE_DEGREES),
              'r': uniform(0, PERSPECTIVE_MAX_RATIO),
              'flip': uniform(0, 1) < 0.5,
              'ml': uniform(0, SQUEEZE_MAX_RATIO),
              'mr': uniform(0, SQUEEZE_MAX_RATIO)}
    fires = uniform(0, 1, 2, 3) < ARM_ROTATE_P  # (B, 2, 3): which pivots rotate
    arm = uniform(-ARM_ROTATE_DEGREES, ARM_ROTATE_DEGREES, 2, 3)
    params['arm_angles'] = torch.where(fires, arm, torch.zeros_like(arm))
    return params


def apply_augmentations(poses, params):
    """Each clip b gets augmentation params['kind'][b] (or none when -1), with its own parameters: the per-clip
    body and hand matrices are the chosen kind's (identity otherwise), arm angles are zero unless kind 3."""
    _check_poses(poses)
    kind = params['kind'].cpu()[:, None, None]  # (B, 1, 1)
    identity = _identity(len(kind))
    rotation = rotation_homography(params['theta'])
    body_H = torch.where(kind == 0, rotation,
                         torch.where(kind == 1, perspective_homography(params['r'], params['flip']),
                                     torch.where(kind == 2, squeeze_homography(params['ml'], params['mr']),
                                                 identity)))  # (B, 3, 3)
    hand_H = torch.where(kind == 0, rotation, identity)
    angles = torch.where(kind == 3, params['arm_angles'].cpu(), 0.0)  # (B, 2, 3)
    return arm_rotate(transform_joints(poses, body_H, hand_H), angles)


def augment_poses(poses, pad_mask=None, generator=None):
    """SPOTER's training augmentation on raw [0, 1] poses (B, T, 54, 2): per clip, with p 0.5 exactly one of
    rotate / perspective / squeeze / arm_rotate (uniformly chosen), parameters from sample_augmentation_params.
    Missing points stay exactly as they were; padding frames (pad_mask True) come out as zeros."""
    _check_poses(poses)
    params = sample_augmentation_params(poses.size(0), generator)
    return _zero_padding(apply_augmentations(poses, params), pad_mask)


# -----------------------------------------------------------------------------
# procedural signs: what each class looks like is fixed by the class index alone (so train, val and test agree);
# the seed only varies the performances. The ground truth: class = wrist trajectories + hand shapes.
# -----------------------------------------------------------------------------
SIGN_WORLD_SEED = 379  # changes every class's look; bump SIGN_GENERATOR_VERSION with any change below
SIGN_GENERATOR_VERSION = 1
# how far one performance strays from its class (std): wrist placement, path coefficients, finger curl, hand angle
STRAY = dict(place=0.035, path=0.025, curl=0.15, angle=0.2)
_SIGN_BODY = np.array([[0.50, 0.80], [0.50, 0.68], [0.47, 0.83], [0.53, 0.83], [0.44, 0.81], [0.56, 0.81],
                       [0.35, 0.65], [0.65, 0.65]])  # nose .. leftShoulder, Y up; elbows and wrists follow the hands
# hand template: per joint (angle from the forearm direction toward the thumb, radius at rest, radius gained per
# unit of straightening, finger index for its curl); fingers are listed Tip, DIP, PIP, MCP as in the CSV
_FINGER_ANGLES = {'index': 0.28, 'middle': 0.08, 'ring': -0.12, 'little': -0.33}
_HAND_TEMPLATE = np.array(
    [[0.0, 0.0, 0.0, 0]] +
    [[a, 0.034, 0.012 * k, f] for f, a in enumerate(_FINGER_ANGLES.values()) for k in (3, 2, 1, 0)] +
    [[0.95, 0.012, 0.011 * k, 4] for k in (3, 2, 1, 0)])  # thumbTip, IP, MP, CMC


def _sign_class(c):
    """The ground truth of class c: wrist path (centre + half-period Fourier terms), finger curls at the start and
    end of the sign, hand orientation; drawn from an RNG seeded by the class index only."""
    rng = np.random.default_rng((SIGN_WORLD_SEED, c))
    centre = np.array([[0.60, 0.45], [0.40, 0.45]]) + rng.uniform([-0.08, -0.12], [0.08, 0.15], size=(2, 2))
    fourier = rng.normal(0, 1, size=(2, 3, 2, 2)) * (0.07 / np.arange(1, 4))[None, :, None, None]
    if rng.random() < 0.4:  # a one-handed sign: hand 0 (the signer's left) rests low, nearly still
        centre[0], fourier[0] = [0.66, 0.22], fourier[0] * 0.1
    return dict(centre=centre, fourier=fourier,  # (hand, xy), (hand, k, cos/sin, xy)
                curl=rng.uniform(0, 1, size=(2, 2, 5)),  # (hand, start/end, finger)
                angle=rng.uniform(-0.8, 0.8, size=2), swing=rng.uniform(0, 0.6, size=2))


def _time_warp(rng, n_frames):
    """Non-uniform speed: positive random speeds at 5 knots, integrated, over a random sub-span of the sign."""
    speed = np.interp(np.linspace(0, 1, n_frames), np.linspace(0, 1, 5), rng.lognormal(0, 0.35, size=5))
    tau = np.cumsum(speed) - speed[0]
    tau = tau / tau[-1] if tau[-1] > 0 else tau
    start, end = rng.uniform(0, 0.1), rng.uniform(0.9, 1.0)
    return start + (end - start) * tau  # (T,) in [0, 1], increasing


def _hand_joints(wrist, curl, angle, thumb_side, scale):
    """21 joints around each frame's wrist: (T, 2), curl (T, 5) in [0, 1], angle (T,) -> (T, 21, 2)."""
    theta, rest, gain, finger = _HAND_TEMPLATE.T
    straight = 1 - 0.7 * curl[:, finger.astype(int)]  # (T, 21): a curled finger's joints sit nearer the palm
    radius = scale * (rest + gain * straight)
    local = radius[..., None] * np.stack([thumb_side * np.sin(theta), np.cos(theta)], -1)  # fingers point up
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rotated = np.stack([cos * local[..., 0] - sin * local[..., 1], sin * local[..., 0] + cos * local[..., 1]], -1)
    return wrist[:, None] + rotated


def _sign_clip(truth, rng, n_frames):
    """One performance of a class: time warp, body proportions, hands, shift/scale, jitter, missing data."""
    t = _time_warp(rng, n_frames)[:, None]  # (T, 1)
    k = np.arange(1, 4)[None, :]  # half periods: the path goes somewhere instead of closing a loop
    basis = np.stack([np.cos(np.pi * k * t), np.sin(np.pi * k * t)], -1)  # (T, 3, 2)
    # each performance strays from the class's path: signers place and draw a sign a little differently
    centre = truth['centre'] + rng.normal(0, STRAY['place'], size=(2, 2))
    fourier = truth['fourier'] + rng.normal(0, STRAY['path'], size=(2, 3, 2, 2)) / np.arange(1, 4)[None, :, None, None]
    wrists = centre[None] + np.einsum('tkc,hkcx->thx', basis, fourier)  # (T, hand, xy)
    body = np.repeat((_SIGN_BODY + rng.normal(0, 0.008, size=(8, 2)))[None], n_frames, 0)  # each signer differs
    shoulders = body[:, [7, 6]]  # hand 0 hangs from leftShoulder, hand 1 from rightShoulder
    elbows = 0.5 * (shoulders + wrists) + np.array([[0.07, -0.06], [-0.07, -0.06]])  # bent outward and down
    hands = []
    for h, thumb_side in ((0, -1.0), (1, 1.0)):  # thumbs point toward the body's midline
        curls = np.clip(truth['curl'][h] + rng.normal(0, STRAY['curl'], size=(2, 5)), 0, 1)
        curl = curls[0] + (curls[1] - curls[0]) * t  # (T, 5): the handshape changes during the sign
        angle = truth['angle'][h] + rng.normal(0, STRAY['angle']) + truth['swing'][h] * np.sin(np.pi * t[:, 0])
        hands.append(_hand_joints(wrists[:, h], curl, angle, thumb_side, rng.uniform(0.85, 1.15)))
    # tensor order: 8 head/shoulder points, rightElbow, leftElbow, rightWrist, leftWrist, hand 0, hand 1
    clip = np.concatenate([body, elbows[:, ::-1], wrists[:, ::-1], hands[0], hands[1]], 1)  # (T, 54, 2)
    clip = 0.5 + rng.uniform(0.9, 1.1) * (clip - 0.5) + rng.uniform(-0.04, 0.04, size=2)  # camera distance, framing
    clip = np.clip(clip + rng.normal(0, 0.003, size=clip.shape), 0.001, 0.999)  # detector jitter; 0 stays "missing"
    for first in (12, 33):  # a hand the detector loses for a few frames
        if rng.random() < 0.3:
            start = rng.integers(0, n_frames)
            clip[start:start + rng.integers(2, 9), first:first + 21] = 0
    if rng.random() < 0.05:  # rarely a shoulder (occluded by the other arm)
        start = rng.integers(0, n_frames)
        clip[start:start + rng.integers(1, 4), rng.choice([6, 7])] = 0
    return clip.astype(np.float32)


def make_sign_clips(num_classes, clips_per_class, seed, min_frames=20, max_frames=60):
    """Procedural signs with known ground truth, in the raw SPOTER convention ((T, 54, 2), [0, 1], Y up, 0 =
    missing). Returns (clips, labels 0-based int64), class by class; deterministic in seed."""
    if not 2 <= min_frames <= max_frames:
        raise UserError(f"make_sign_clips: need 2 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for c in range(num_classes):
        truth = _sign_class(c)
        for _ in range(clips_per_class):
            clips.append(_sign_clip(truth, rng, int(rng.integers(min_frames, max_frames + 1))))
            labels.append(c)
    return clips, np.array(labels, dtype=np.int64)


def write_sign_csvs(folder, num_classes=10, clips_per_class=(40, 10, 10), seed=0, log=print):
    """Write procedural train/val/test SPOTER CSVs (0-based labels) into folder, split i with seed 3*seed + i
    (disjoint for every seed). Skipped when meta.json records the same recipe and each file still has its recorded
    sha256; otherwise written again (one log line says why, unless there was nothing yet)."""
    recipe = dict(version=SIGN_GENERATOR_VERSION, world_seed=SIGN_WORLD_SEED, num_classes=num_classes,
                  clips_per_class=list(clips_per_class), seed=seed)
    paths = [os.path.join(folder, f'{split}.csv') for split in ('train', 'val', 'test')]
    meta_path = os.path.join(folder, 'meta.json')
    meta, problem = read_cache_meta(meta_path, recipe=recipe)
    if meta:
        return tuple(paths)
    if problem:
        log(f"built-in signs {folder}: written again: {problem}")
    os.makedirs(folder, exist_ok=True)
    for i, path in progress(enumerate(paths), f"built-in signs {folder}: CSV files", 3):
        write_spoter_csv(path, *make_sign_clips(num_classes, clips_per_class[i], seed=3 * seed + i))
    write_cache_meta(meta_path, paths, recipe=recipe)  # last: marks done
    return tuple(paths)


# -----------------------------------------------------------------------------
# audio: WAV files + CSV manifests or waveform arrays -> log-mel spectrograms (librosa's definition) -> an HDF5
# feature cache per split, read lazily by DataLoader workers
# -----------------------------------------------------------------------------

DREAMCATCHER_LABELS = ('quiet', 'non_wearer', 'bruxism', 'swallow', 'somniloquy', 'breathe', 'cough', 'snore',
                       'movements')  # the 9 DreamCatcher event ids, in id order
AUDIO_PATH_COLUMNS = ('path', 'file', 'filename', 'audio_path', 'wav')
AUDIO_LABEL_COLUMNS = ('label', 'event_label', 'class')
_PCM_DTYPES = {1: np.uint8, 2: np.dtype('<i2'), 4: np.dtype('<i4')}  # bytes per sample -> dtype (24-bit: by hand)


def read_wav(path):
    """RIFF/WAVE file -> (mono float32 waveform in [-1, 1], sample rate). PCM 8/16/24/32-bit or IEEE float 32/64-bit
    (plain or WAVE_FORMAT_EXTENSIBLE); channels are averaged. Anything else is refused with the reason."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"audio file {path}: cannot be read ({e.strerror})") from None
    if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WAVE':
        raise UserError(f"audio file {path}: not a RIFF/WAVE file (starts with {data[:12]!r})")
    chunks, pos = {}, 12
    while pos + 8 <= len(data):  # walk the chunks: 4-byte id, little-endian size, body padded to an even length
        chunk_id, size = struct.unpack_from('<4sI', data, pos)
        chunks.setdefault(chunk_id, data[pos + 8:pos + 8 + size])
        pos += 8 + size + (size & 1)
    fmt, body = chunks.get(b'fmt '), chunks.get(b'data')
    if fmt is None or len(fmt) < 16 or body is None:
        raise UserError(f"audio file {path}: no 'fmt ' or 'data' chunk: a truncated or foreign WAV")
    tag, channels, rate, _, _, bits = struct.unpack_from('<HHIIHH', fmt)
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the real tag
        tag = struct.unpack_from('<H', fmt, 24)[0]
    width = bits // 8
    if channels == 0 or rate == 0 or not ((tag == 1 and width in (1, 2, 3, 4)) or (tag == 3 and width in (4, 8))):
        raise UserError(f"audio file {path}: unsupported sample format (format tag {tag}, {bits} bits, {channels} "
                        f"channels); expected PCM 8/16/24/32-bit or float 32/64-bit")
    n = len(body) // (width * channels) * channels
    if tag == 3:
        samples = np.frombuffer(body, f'<f{width}', n).astype(np.float32)
    elif width == 3:  # 24-bit: assemble little-endian triples, the top byte signed
        b = np.frombuffer(body, np.uint8, n * 3).reshape(-1, 3).astype(np.int32)  # (n, 3)
        samples = ((b[:, 2] << 24 | b[:, 1] << 16 | b[:, 0] << 8) >> 8).astype(np.float32) / 2 ** 23
    elif width == 1:  # 8-bit WAV is unsigned, centred on 128
        samples = (np.frombuffer(body, np.uint8, n).astype(np.float32) - 128) / 128
    else:
        samples = np.frombuffer(body, _PCM_DTYPES[width], n).astype(np.float32) / 2 ** (bits - 1)
    return samples.reshape(-1, channels).mean(axis=1), rate  # (frames, channels) -> mono


def write_wav(path, waveform, sample_rate, bits=16, channels=1):
    """Write float samples in [-1, 1] as PCM (8/16/24/32-bit) with the standard library's wave module; channels > 1
    repeats the signal in every channel."""
    x = np.repeat(np.clip(np.asarray(waveform, np.float64), -1, 1)[:, None], channels, axis=1)  # (n, channels)
    if bits == 8:  # 8-bit WAV is unsigned
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    else:
        ints = np.round(x * (2 ** (bits - 1) - 1)).astype('<i4')
        if bits == 24:  # the low 3 bytes of each little-endian int32
            raw = ints.view(np.uint8).reshape(*ints.shape, 4)[..., :3].tobytes()
        else:
            raw = ints.astype(f'<i{bits // 8}').tobytes()
    with wave.open(str(path), 'wb') as w:
        w.setnchannels(channels)
        w.setsampwidth(bits // 8)
        w.setframerate(sample_rate)
        w.writeframes(raw)


def resample(waveform, rate_in, rate_out):
    """Band-limited resampling by truncating or zero-extending the spectrum (the FFT method); exact for signals
    below both Nyquist frequencies, good enough for the 1-5 s clips here."""
    n_out = int(round(len(waveform) * rate_out / rate_in))
    spectrum = np.fft.rfft(waveform.astype(np.float64))
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    keep = min(len(spectrum), len(out))
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / len(waveform))).astype(np.float32)


def fit_clip(waveform, length):
    """Zero-pad the tail or crop the tail to `length` samples (the head is kept, as upstream does)."""
    return waveform[:length] if len(waveform) >= length else np.pad(waveform, (0, length - len(waveform)))


@functools.lru_cache(maxsize=8)
def _hann_window(length):
    return torch.hann_window(length, periodic=True)  # periodic: the DFT-even window librosa's get_window returns


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax):
    """(n_mels, n_fft // 2 + 1) float32 triangles on the Slaney mel scale (linear below 1 kHz, 27 steps per factor
    6.4 above), each scaled by 2 / (f_{i+2} - f_i) so it has unit area (Slaney normalisation), as librosa does."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz_to_mel(f):
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    mels = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    hz = np.where(mels < min_log_mel, mels * f_sp, min_log_hz * np.exp(logstep * (mels - min_log_mel)))  # mel -> Hz
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)  # FFT bin centre frequencies
    ramps = hz[:, None] - bins[None, :]  # (n_mels + 2, bins)
    widths = np.diff(hz)
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling)) * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel_spectrogram(waveform, sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=64,
                        fmin=20.0, fmax=8000.0, top_db=80.0):
    """Log-mel spectrogram in dB, (n_mels, 1 + len // hop_length) float32, exactly librosa's
    power_to_db(melspectrogram(...), ref=np.max, top_db=80) with these settings: periodic Hann window of win_length
    zero-padded (centred) to n_fft, frames centred on every hop with zero (constant) padding of n_fft // 2 at both
    ends, power |STFT|^2, Slaney mel filters, 10 log10(max(S, 1e-10)) relative to the clip's maximum, floored at
    top_db below it. float32 throughout: 8x faster than a float64 STFT and within 0.002 dB of it."""
    x = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    window = _hann_window(win_length)
    spec = torch.stft(x, n_fft, hop_length, win_length, window, center=True, pad_mode='constant',
                      return_complex=True)  # (n_fft // 2 + 1, frames); torch centres the short window in n_fft
    power = spec.real.square() + spec.imag.square()
    mel = mel_filterbank(sample_rate, n_fft, n_mels, float(fmin), float(fmax)) @ power  # (n_mels, frames)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = db - db.max()  # ref = the clip's maximum: the loudest cell is 0 dB
    return db.clamp_min(-top_db).numpy()


def _dreamcatcher_name(text):
    """A manifest label as a name: DreamCatcher ids '0'..'8' become their names; anything else is kept as written."""
    text = text.strip()
    return DREAMCATCHER_LABELS[int(text)] if text.isdigit() and int(text) < len(DREAMCATCHER_LABELS) else text


def map_label(raw, label_map, where):
    """Class id of a raw label (name or DreamCatcher id) under label_map; None for a DreamCatcher class the task
    leaves out (counted by the caller); a UserError naming `where` for anything else."""
    raw = str(raw).strip()
    for key in (raw, _dreamcatcher_name(raw)):
        if key in label_map:
            return label_map[key]
    if _dreamcatcher_name(raw) in DREAMCATCHER_LABELS:
        return None
    raise UserError(f"{where}: label {raw!r} is not in label_map {label_map} nor a DreamCatcher label "
                    f"{list(DREAMCATCHER_LABELS)}")


def _hash_split(path):
    """'train' / 'val' / 'test' at 70 / 15 / 15 %, from the clip's path alone: stable when rows are added."""
    h = int(hashlib.sha1(path.encode()).hexdigest()[:8], 16) % 100
    return 'train' if h < 70 else 'val' if h < 85 else 'test'


def read_audio_manifest(manifest, label_map, audio_root=''):
    """CSV manifest -> {split: [(wav path, class id), ...]}, n_left_out. Reads the path, label and (optional)
    split columns only, no audio. Without a split column clips are split 70/15/15 by a hash of their path.
    Rows are numbered as lines of the file (the header is row 1)."""
    if not os.path.isfile(manifest):
        raise UserError(f"manifest {manifest}: no such file")
    root = audio_root or os.path.dirname(os.path.abspath(manifest))
    splits, left_out, rows = {}, 0, 0
    with open(manifest, newline='', encoding='utf-8-sig') as f:  # utf-8-sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f)
        try:
            columns = reader.fieldnames
            if not columns:
                raise UserError(f"manifest {manifest} is empty: expected a header with a path column (one of "
                                f"{AUDIO_PATH_COLUMNS}) and a label column (one of {AUDIO_LABEL_COLUMNS})")
            path_col = next((c for c in AUDIO_PATH_COLUMNS if c in columns), None)
            label_col = next((c for c in AUDIO_LABEL_COLUMNS if c in columns), None)
            if path_col is None or label_col is None:
                raise UserError(f"manifest {manifest}: needs a path column (one of {AUDIO_PATH_COLUMNS}) and a label "
                                f"column (one of {AUDIO_LABEL_COLUMNS}); it has {columns}")
            for rows, row in enumerate(reader, start=1):
                where = f"manifest {manifest}, row {reader.line_num}"
                if not (row[path_col] or '').strip():  # a short row or an empty cell: not the folder itself
                    raise UserError(f"{where}, column {path_col!r}: empty; expected the path of a WAV file")
                label = map_label(row[label_col] or '', label_map, f"{where}, column {label_col!r}")
                if label is None:
                    left_out += 1
                    continue
                split = (row.get('split') or '').strip() or _hash_split(row[path_col])
                splits.setdefault(split, []).append((os.path.join(root, row[path_col]), label))
        except UnicodeDecodeError:  # a Latin-1 or UTF-16 export
            raise _utf8_error(manifest, f"manifest {manifest}", 1) from None
        except csv.Error as e:  # a NUL byte, an unclosed quote
            raise UserError(f"manifest {manifest}, row {reader.line_num + 1}: not a readable CSV ({e})") from None
    if not rows:
        raise UserError(f"manifest {manifest} has a header but no data rows")
    if not splits:
        raise UserError(f"manifest {manifest}: no clip of the classes in label_map {label_map}")
    return splits, left_out


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside _SAFE_GLOBALS; the message names it."""


_np_core = getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core
# what numpy's pickles of plain arrays, dtypes and scalars refer to, under the module names of the numpy (1.x or 2,
# Python 2 or 3) that wrote them; plus _codecs.encode, how Python 3 writes bytes at protocol 2. Dicts, lists, tuples,
# str, bytes, int and float are pickle opcodes and need no global.
_SAFE_GLOBALS = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype, ('_codecs', 'encode'): codecs.encode}
for _package in ('numpy.core', 'numpy._core'):
    _SAFE_GLOBALS.update({(f'{_package}.multiarray', '_reconstruct'): _np_core.multiarray._reconstruct,
                          (f'{_package}.multiarray', 'scalar'): _np_core.multiarray.scalar,
                          (f'{_package}.numeric', '_frombuffer'): _np_core.numeric._frombuffer})


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numbers, strings, containers and numpy arrays, nothing else: every global is looked up in
    _SAFE_GLOBALS (never imported), so a __reduce__ payload (os.system, builtins.eval, ...) is refused, not run."""

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return _SAFE_GLOBALS[module, name]


# .npy format version -> header reader; 3.0 differs from 2.0 only in utf-8 field names, irrelevant to hasobject
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
                (3, 0): np.lib.format.read_array_header_2_0}


def _read_npy(zip_file, key, path, what, pickled):
    """One member of an npz: numbers or strings through numpy's reader with pickling off; an object array (a pickle)
    through _ArrayUnpickler if key is in `pickled`, else refused."""
    with zip_file.open(f'{key}.npy') as f:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_HEADERS:
            raise ValueError(f"array {key!r}: unsupported .npy format version {version}")
        if not _NPY_HEADERS[version](f)[2].hasobject:
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
        if key not in pickled:
            raise UserError(f"{what} {path}: array {key!r} holds Python objects (a pickle), which are never loaded; "
                            f"expected an array of numbers or strings")
        try:
            return _ArrayUnpickler(f, encoding='latin1').load()  # latin1: Python 2's byte strings (dSprites)
        except _RefusedGlobal as e:
            raise UserError(f"{what} {path}: array {key!r} is a pickle that would load {e}; only numbers, strings, "
                            f"containers and numpy arrays are unpickled (no data file may run code)") from None
        except Exception as e:  # garbage can fail in any way; the restricted unpickler runs no code meanwhile
            raise UserError(f"{what} {path}: array {key!r} is not a readable pickle ({type(e).__name__}: {e})") from None


def read_array_file(path, keys, what, pickled=()):
    """-> ({key: array} for those of `keys` the .npz / .h5 file holds, the names of all its arrays). Nothing in
    the file can run code: HDF5 has no pickles, and an npz object array (a pickle) is refused unless its key is in
    `pickled`, whose pickle goes through _ArrayUnpickler. A file that cannot be read raises UserError naming it."""
    try:
        if path.endswith(('.h5', '.hdf5')):
            with h5py.File(path, 'r') as f:
                return {k: f[k][()] for k in keys if isinstance(f.get(k), h5py.Dataset)}, list(f)
        with zipfile.ZipFile(path) as z:
            names = [n[:-len('.npy')] for n in z.namelist() if n.endswith('.npy')]
            return {k: _read_npy(z, k, path, what, pickled) for k in keys if k in names}, names
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise UserError(f"{what} {path}: cannot read it as .npz or HDF5 ({type(e).__name__}: {e})") from None


def read_waveform_arrays(path, label_map):
    """.npz / .h5 of raw waveforms -> {split: [(waveform float32, class id), ...]}, n_left_out, sample_rate, and
    {split: [name of each clip]} ('<path> row i', for log lines). Arrays: 'waveforms' (N, L) float in [-1, 1] or
    int16, 'labels' (N,) names or ids, optional 'lengths' (N,) integers in 0..L (valid samples per row), 'split'
    (N,) names, 'sample_rate' (one positive integer, default 16000). Any other shape or dtype is refused."""
    if not os.path.isfile(path):
        raise UserError(f"waveform file {path}: no such file")
    arrays, found = read_array_file(path, ('waveforms', 'labels', 'lengths', 'split', 'sample_rate'), 'waveform file')
    where = f"waveform file {path}"
    for key in ('waveforms', 'labels'):
        if key not in arrays:
            raise UserError(f"{where}: no {key!r} array (it has {sorted(found)})")
    waves, labels = arrays['waveforms'], arrays['labels']
    if waves.dtype.kind != 'f' and waves.dtype != np.int16:
        raise UserError(f"{where}: 'waveforms' has dtype {waves.dtype}; expected float samples in [-1, 1] or int16")
    if waves.ndim != 2 or labels.shape != waves.shape[:1]:
        raise UserError(f"{where}: expected waveforms (N, L) and labels (N,), got {waves.shape} and {labels.shape}")
    n, width = waves.shape
    lengths = arrays.get('lengths', np.full(n, width))
    if lengths.shape != (n,) or lengths.dtype.kind not in 'iu':
        raise UserError(f"{where}: 'lengths' has shape {lengths.shape} and dtype {lengths.dtype}; expected ({n},) "
                        f"integers, the valid samples of each row")
    bad = (lengths < 0) | (lengths > width)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{where}: 'lengths'[{i}] = {int(lengths[i])} is outside 0..{width} (the row length of "
                        f"'waveforms'); {int(bad.sum())} lengths are")
    names = arrays.get('split', np.array([''] * n))
    if names.shape != (n,):
        raise UserError(f"{where}: 'split' has shape {names.shape}; expected ({n},), one split name per waveform")
    rate = arrays.get('sample_rate', np.array(16000))
    if rate.shape != () or rate.dtype.kind not in 'iuf' or not (rate > 0 and float(rate).is_integer()):
        raise UserError(f"{where}: 'sample_rate' is {repr(rate.tolist())[:40]}; expected one positive integer (Hz)")
    scale = 1 / 32768 if waves.dtype == np.int16 else 1.0
    splits, clip_names, left_out = {}, {}, 0
    for i in range(n):
        raw = labels[i].decode() if isinstance(labels[i], bytes) else labels[i]
        label = map_label(raw, label_map, f"{where}, 'labels'[{i}]")
        if label is None:
            left_out += 1
            continue
        split = names[i].decode() if isinstance(names[i], bytes) else str(names[i]) or _hash_split(str(i))
        splits.setdefault(split, []).append((waves[i, :int(lengths[i])].astype(np.float32) * scale, label))
        clip_names.setdefault(split, []).append(f"{path} row {i}")
    return splits, left_out, int(rate), clip_names


# seed 001's recipe: the defaults train_audio.py and train_kd.py share, defined once here so they cannot drift
AUDIO_FEATURES = dict(sample_rate=16000, clip_seconds=5.0, n_fft=512, win_length=400, hop_length=160, n_mels=64,
                      fmin=20.0, fmax=8000.0, top_db=80.0)
AUDIO_RECIPE = dict(label_map={'quiet': 0, 'breathe': 1, 'snore': 2}, batch_size=64, learning_rate=1e-3,
                    weight_decay=1e-5, class_weights=[1.0, 1.5, 5.5], patience=5, max_epochs=50, seed=42,
                    input_norm='train_stats', num_workers=4)


AUDIO_CHECK_CLIPS = 64  # clips whose sha256 every reuse verifies, evenly spaced (all of a smaller cache): ~8 ms


def _audio_cache_problem(h5_path, expected):
    """Why an audio feature cache cannot be used (None if it can): unreadable, incomplete, built from other
    settings or other clips (`expected`: attributes that must match), inconsistent shapes, non-finite mean/std,
    labels failing their sha256, or one of AUDIO_CHECK_CLIPS evenly spaced clips failing the sha256 recorded when it
    was written. Only those clips are read: damage confined to other clips of a larger cache is not seen here."""
    try:
        with h5py.File(h5_path, 'r') as f:
            if not f.attrs.get('complete', False):
                return "it is incomplete (no complete=True attribute)"
            for key, value in expected.items():
                if f.attrs.get(key) != value:
                    return f"its {key} differs from the current one"
            n, features, labels = int(f.attrs['n_samples']), f['features'], f['labels']
            if features.shape[0] != n or labels.shape != (n,):
                return f"its shapes disagree: n_samples {n}, features {features.shape}, labels {labels.shape}"
            if 'digests' not in f or f['digests'].shape != (n, 32):
                return "it has no per-clip checksums (an older version wrote it)"
            if not (np.isfinite(f.attrs['mean']) and np.isfinite(f.attrs['std'])):
                return "its mean/std are not finite"
            if _arrays_sha256(labels[()]) != f.attrs.get('labels_sha256'):
                return "its labels fail their sha256 check (changed after it was written)"
            digests = f['digests'][()]
            for i in np.unique(np.linspace(0, n - 1, min(n, AUDIO_CHECK_CLIPS)).astype(np.int64)):
                if hashlib.sha256(features[i]).digest() != digests[i].tobytes():  # one chunk read (fancy: 10x slower)
                    return f"clip {i} fails its sha256 check (changed after it was written)"
    except (OSError, KeyError, ValueError, TypeError) as e:  # truncated or foreign file: h5py raises OSError
        return f"it cannot be read ({type(e).__name__})"
    return None


def _load_clip(source, array_rate, sample_rate):
    """A manifest's WAV path or an array row -> float32 waveform at sample_rate."""
    waveform, rate = read_wav(source) if isinstance(source, str) else (source, array_rate)
    return waveform if rate == sample_rate else resample(waveform, rate, sample_rate)


def build_audio_cache(h5_path, items, features, attrs, array_rate=None, batch_size=128, log=print, names=None):
    """Log-mel spectrograms of items [(WAV path or waveform, class id)] into h5_path: 'features' (N, n_mels, T)
    float32 stored one sample per chunk, uncompressed (shuffled reads stay fast), 'labels' (N,), 'digests' (N, 32)
    uint8 (each clip's sha256, checked at reuse), written in batches to h5_path.tmp<pid>, closed, then renamed over
    h5_path: an interrupted build never leaves a readable partial file and the previous cache stays until the new
    one is complete. Empty clips and clips whose samples or log-mel features are not finite (a float WAV beyond
    ~1e19 overflows the float32 power) are skipped, counted and named in the log (names[i] names item i, default
    its path). The attributes (n_samples, train mean/std summed in float64, attrs) go last, 'complete' the very last."""
    missing = [s for s, _ in items if isinstance(s, str) and not os.path.isfile(s)]
    if missing:
        raise UserError(f"audio file {missing[0]}: no such file ({len(missing)} of {len(items)} clips missing)")
    length = int(round(features['clip_seconds'] * features['sample_rate']))
    mel_args = {k: features[k] for k in ('sample_rate', 'n_fft', 'win_length', 'hop_length', 'n_mels', 'fmin',
                                         'fmax', 'top_db')}
    frames = 1 + length // features['hop_length']
    os.makedirs(os.path.dirname(h5_path) or '.', exist_ok=True)
    tmp, threads, t0 = f'{h5_path}.tmp{os.getpid()}', torch.get_num_threads(), time.time()  # a .tmp per process
    torch.set_num_threads(1)  # one clip at a time is fastest on one thread (batched STFTs are slower on CPU)
    try:
        with replaced_when_done(h5_path, tmp), h5py.File(tmp, 'w') as f:
            out = f.create_dataset('features', (0, features['n_mels'], frames), 'f4', chunks=(1, features['n_mels'],
                                   frames), maxshape=(None, features['n_mels'], frames))
            kept, skipped, digests, total, total_sq, batch = [], [], [], 0.0, 0.0, []
            for i, (source, label) in progress(enumerate(items), f"cache {h5_path}: clips", len(items), log=log,
                                               last=False):  # the line after the loop says how it went
                waveform = _load_clip(source, array_rate, features['sample_rate'])
                why = 'empty' if len(waveform) == 0 else None if np.isfinite(waveform).all() else 'non-finite samples'
                if why is None:
                    spec = log_mel_spectrogram(fit_clip(waveform, length), **mel_args)  # (n_mels, frames)
                    why = None if np.isfinite(spec).all() else 'non-finite log-mel'
                if why:  # the upstream skips these too; counted and named, never zero-filled
                    name = names[i] if names else source if isinstance(source, str) else f"item {i}"
                    skipped.append(f"{name} ({why})")
                else:
                    cells = spec.ravel().astype(np.float64)  # float64 sums: float32 ones drift over 10^8 cells
                    total, total_sq = total + cells.sum(), total_sq + cells @ cells
                    digests.append(hashlib.sha256(spec).digest())
                    batch.append(spec)
                    kept.append(label)
                if batch and (len(batch) == batch_size or i == len(items) - 1):  # one write per batch of clips
                    block = np.stack(batch)  # (batch, n_mels, frames)
                    out.resize(len(kept), axis=0)
                    out[len(kept) - len(block):] = block
                    batch = []
            first = f": {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}" if skipped else ''
            if not kept:
                raise UserError(f"{h5_path}: none of the {len(items)} clips is usable (all empty or non-finite){first}")
            count = len(kept) * features['n_mels'] * frames
            mean = total / count
            labels = np.array(kept, dtype=np.int64)
            f.create_dataset('labels', data=labels)
            f.create_dataset('digests', data=np.frombuffer(b''.join(digests), np.uint8).reshape(-1, 32))  # (N, 32)
            f.attrs.update(n_samples=len(kept), skipped=len(skipped), mean=mean, labels_sha256=_arrays_sha256(labels),
                           std=math.sqrt(max(total_sq / count - mean * mean, 1e-12)), **attrs)
            f.attrs['complete'] = True  # last: a file without it was interrupted
    finally:
        torch.set_num_threads(threads)
    seconds = time.time() - t0
    log(f"cache {h5_path}: {len(kept):,} clips written in {seconds:.1f}s ({len(items) / max(seconds, 1e-9):,.0f} "
        f"clips/s), {len(skipped)} empty/non-finite clips skipped{first}")


def prepare_audio_cache(cache_dir, features, label_map, manifest='', audio_root='', data='',
                        splits=('train', 'val', 'test'), skip_existing=True, log=print):
    """The HDF5 feature cache of each split of a manifest (+ WAVs) or a waveform array file: {split: path}, and
    the number of clips whose DreamCatcher class the label_map leaves out. A split's cache is reused only while
    its attributes match the feature settings, the label map and the clips (paths, labels, file sizes and
    modification times, or the array bytes) and its checksums verify; otherwise (or with skip_existing=False) it
    is rebuilt, with one log line saying why. Each source and feature setting has its own folder, so runs with
    other settings (a sweep over n_mels, say) neither rebuild nor read each other's."""
    ids = sorted(set(label_map.values()))
    if ids != list(range(len(ids))):
        raise UserError(f"label_map={label_map}: class ids must be 0..K-1, got {ids}")
    if bool(manifest) == bool(data):
        raise UserError("give exactly one audio source: --manifest=labels.csv (+ --audio_root) or --data=waves.npz")
    source, array_rate, names = manifest or data, None, {}
    if manifest:
        by_split, left_out = read_audio_manifest(manifest, label_map, audio_root)
    else:
        by_split, left_out, array_rate, names = read_waveform_arrays(data, label_map)
    feature_hash = hashlib.sha256(json.dumps(features, sort_keys=True).encode()).hexdigest()[:16]
    source_hash = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, 'audio', f'{source_hash}-{feature_hash}')  # runs with other settings never meet
    paths = {}
    for split in splits:
        if split not in by_split:
            raise UserError(f"{source}: no clips in split {split!r} (it has {sorted(by_split)})")
        items, digest = by_split[split], hashlib.sha256()
        for clip, label in items:  # what the clips are: path, size, mtime (as make compares) and label, or samples
            if isinstance(clip, str):
                stat = os.stat(clip) if os.path.isfile(clip) else None
                digest.update(f"{clip}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}|{label}\n".encode())
            else:
                digest.update(clip.tobytes() + str(label).encode())
        attrs = dict(feature_hash=feature_hash, features=json.dumps(features, sort_keys=True),
                     dataset_hash=digest.hexdigest()[:16], label_map=json.dumps(label_map, sort_keys=True),
                     source=os.path.abspath(source))
        paths[split] = os.path.join(folder, f'{split}.h5')
        problem = _audio_cache_problem(paths[split], {k: attrs[k] for k in ('feature_hash', 'dataset_hash',
                                                                               'label_map')}) \
            if os.path.exists(paths[split]) else "it does not exist yet"
        if problem is None and skip_existing:
            log(f"cache {paths[split]}: up to date ({split}), reused")
            continue
        log(f"cache {paths[split]}: building {len(items):,} {split} clips ({problem or 'skip_existing=False'})")
        build_audio_cache(paths[split], items, features, attrs, array_rate, log=log, names=names.get(split))
    return paths, left_out


class SpectrogramCache(torch.utils.data.Dataset):
    """The samples of one split's cache: (features (1, n_mels, T) float32, class id). The HDF5 file is opened on
    first use inside each process (each DataLoader worker), never in __init__: an open handle cannot be pickled to
    spawned workers, and one shared across fork can corrupt reads."""

    def __init__(self, h5_path):
        with h5py.File(h5_path, 'r') as f:
            self.labels = f['labels'][()]
            self.mean, self.std = float(f.attrs['mean']), float(f.attrs['std'])
            self.shape = f['features'].shape[1:]  # (n_mels, frames)
        self.h5_path, self._file = h5_path, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self._file is None:
            self._file = h5py.File(self.h5_path, 'r')
        return torch.from_numpy(self._file['features'][i])[None], int(self.labels[i])  # (1, n_mels, T), label

    def __getstate__(self):  # what a worker receives: no handle
        return {**self.__dict__, '_file': None}


# the built-in stand-in for DreamCatcher's 3-class task: procedural quiet / breathe / snore clips as 16-bit WAVs
SLEEP_SOUNDS_VERSION = 1
SLEEP_CLASSES = ('quiet', 'breathe', 'snore')
SLEEP_SHARES = (0.55, 0.35, 0.10)  # DreamCatcher's training split: 55.6 / 35.1 / 9.3 %


def _band_noise(rng, n, sample_rate, low, high):
    """White noise keeping only the low..high Hz band (zeroed FFT bins), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    spectrum[(freqs < low) | (freqs > high)] = 0
    x = np.fft.irfft(spectrum, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _swell(n, start, end):
    """A raised-sine envelope rising and falling between fractions start..end of n samples, 0 elsewhere."""
    t = np.linspace(0, 1, n)
    inside = (t >= start) & (t <= end)
    envelope = np.zeros(n)
    envelope[inside] = np.sin(np.pi * (t[inside] - start) / (end - start)) ** 2
    return envelope


def sleep_sound(kind, rng, sample_rate=16000):
    """One procedural clip of 0.6-1.4 s: quiet = room noise (sometimes a faint rustle); breathe = one or two slow
    swells of band-limited noise; snore = a low harmonic buzz (f0 50-130 Hz) with an amplitude swell. Every clip
    gets room noise at a random level and, a third of the time, mains hum, so no single cue gives the class."""
    n = int(sample_rate * rng.uniform(0.6, 1.4))
    t = np.arange(n) / sample_rate
    x = 10 ** rng.uniform(-3.3, -2.0) * _band_noise(rng, n, sample_rate, 20, 6000)  # room noise
    if rng.random() < 0.33:  # mains hum at 50 or 60 Hz and its harmonic
        f = rng.choice([50.0, 60.0])
        x += 10 ** rng.uniform(-3.0, -2.2) * (np.sin(2 * np.pi * f * t) + 0.5 * np.sin(4 * np.pi * f * t))
    if kind == 'quiet' and rng.random() < 0.3:  # a faint rustle: short broadband burst
        start = rng.uniform(0, 0.8)
        gain = 10 ** rng.uniform(-2.6, -1.8)  # drawn before the noise: the random stream stays as it was
        x += gain * _band_noise(rng, n, sample_rate, 200, 5000) * _swell(n, start, start + 0.15)
    elif kind == 'breathe':
        low = rng.uniform(150, 600)
        noise = _band_noise(rng, n, sample_rate, low, low * rng.uniform(2.5, 6))
        split = rng.uniform(0.35, 0.65) if rng.random() < 0.5 else 1.0  # inhale + exhale, or one long breath
        envelope = _swell(n, 0.0, split) + (_swell(n, split, 1.0) if split < 1 else 0)
        x += 10 ** rng.uniform(-2.3, -1.0) * noise * envelope
    elif kind == 'snore':
        f0 = rng.uniform(50, 130) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))  # slow vibrato
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        buzz = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 12))  # harmonics, 1/k
        buzz += 0.3 * _band_noise(rng, n, sample_rate, 100, 1500)  # the turbulent part of a snore
        start = rng.uniform(0.0, 0.3)
        x += 10 ** rng.uniform(-2.0, -0.8) * buzz / 3 * _swell(n, start, rng.uniform(start + 0.5, 1.0))
    return np.clip(x, -1, 1).astype(np.float32)


def write_sleep_sounds(folder, n_clips=2000, seed=0, sample_rate=16000, log=print):
    """Write n_clips procedural sleep sounds (55/35/10 % quiet/breathe/snore, split 70/15/15 % train/val/test) as
    16-bit WAVs plus manifest.csv (path, label, split), and return the manifest's path. Deterministic in seed;
    skipped when meta.json records the same recipe and the manifest and every WAV still have their sha256
    (~60 ms for 2000 clips); otherwise written again, with one log line saying why."""
    recipe = dict(version=SLEEP_SOUNDS_VERSION, n_clips=n_clips, seed=seed, sample_rate=sample_rate)
    manifest, meta_path = os.path.join(folder, 'manifest.csv'), os.path.join(folder, 'meta.json')
    meta, problem = read_cache_meta(meta_path, recipe=recipe)
    if meta:
        return manifest
    if problem:
        log(f"built-in sleep sounds {folder}: written again: {problem}")
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(SLEEP_CLASSES), size=n_clips, p=SLEEP_SHARES)
    splits = rng.choice(['train', 'val', 'test'], size=n_clips, p=[0.7, 0.15, 0.15])
    os.makedirs(os.path.join(folder, 'wavs'), exist_ok=True)
    rows, wavs = ['path,label,split'], []
    for i, (kind, split) in progress(enumerate(zip(kinds, splits)), f"built-in sleep sounds {folder}: WAVs", n_clips):
        name = f'wavs/{i:05d}_{SLEEP_CLASSES[kind]}.wav'
        wavs.append(os.path.join(folder, name))
        write_wav(wavs[-1], sleep_sound(SLEEP_CLASSES[kind], rng, sample_rate), sample_rate)
        rows.append(f'{name},{SLEEP_CLASSES[kind]},{split}')
    write_atomic(manifest, ('\n'.join(rows) + '\n').encode())
    write_cache_meta(meta_path, [manifest] + wavs, recipe=recipe)  # last: marks done
    return manifest


# -----------------------------------------------------------------------------
# sprites and categorical grids (train_vae.py): dSprites-format npz, generic grid npz/HDF5, the procedural
# dSprites-like generator with ground-truth factors, multi-colour grids, padding, and PNG pictures
# -----------------------------------------------------------------------------
SPRITE_GENERATOR_VERSION = 1  # bump with any change to the sprite or grid drawing below (it keys the cache)
SPRITE_FACTOR_NAMES = ('color', 'shape', 'scale', 'orientation', 'posX', 'posY')
SPRITE_FACTOR_SIZES = (1, 3, 6, 40, 32, 32)  # row-major, posY fastest: 737,280 images
IMAGE_KEYS, FACTOR_KEYS = ('imgs', 'grids'), ('latents_classes', 'factors')


def sprite_factor_values(classes):
    """latents_classes (N, 6) -> latents_values (N, 6) as dSprites stores them: colour 1, shape 1..3, scale
    0.5..1 (6 steps), orientation 0..2pi (40 steps, both ends included), posX and posY 0..1 (32 steps)."""
    grids = [np.ones(1), np.arange(1.0, 4.0), np.linspace(0.5, 1, 6), np.linspace(0, 2 * np.pi, 40),
             np.linspace(0, 1, 32), np.linspace(0, 1, 32)]
    return np.stack([grids[k][classes[:, k]] for k in range(6)], 1)


def render_sprites(classes, chunk=2048):
    """Draw 64x64 binary sprites for latents_classes (N, 6). Centre 16 + 32 pos (pixels); pixel offsets (u, v)
    from it are rotated by the orientation, then: square |u|,|v| <= 10s; ellipse (u/13s)^2 + (v/7.2s)^2 <= 1;
    heart (X^2+Y^2-1)^3 - X^2 Y^3 <= 0, X = u/(19.5s/2.278), Y = -v/(16s/2.242) + 0.121."""
    values = sprite_factor_values(classes)
    pixel = np.arange(64) + 0.5  # pixel centres
    out = np.zeros((len(classes), 64, 64), dtype=np.uint8)
    for start in progress(range(0, len(classes), chunk), "built-in sprites: images", len(classes), chunk):
        shape, s, angle, px, py = (values[start:start + chunk, k][:, None, None] for k in range(1, 6))
        du = pixel[None, None, :] - (16 + 32 * px)  # (B, 1, 64): column offset
        dv = pixel[None, :, None] - (16 + 32 * py)  # (B, 64, 1): row offset, pointing down
        u = np.cos(angle) * du + np.sin(angle) * dv  # (B, 64, 64)
        v = -np.sin(angle) * du + np.cos(angle) * dv
        square = (np.abs(u) <= 10 * s) & (np.abs(v) <= 10 * s)
        ellipse = (u / (13 * s)) ** 2 + (v / (7.2 * s)) ** 2 <= 1
        X, Y = u / (19.5 * s / 2.278), -v / (16 * s / 2.242) + 0.121
        heart = (X ** 2 + Y ** 2 - 1) ** 3 - X ** 2 * Y ** 3 <= 0
        out[start:start + chunk] = np.where(shape == 1, square, np.where(shape == 2, ellipse, heart))
    return out


def make_sprites(n, seed=0):
    """n sprites from the 737,280-point factor grid (n = 0: all of it, in dSprites' order; else a random subset
    without repeats, in grid order). Returns (imgs (N, 64, 64) uint8 0/1, latents_classes (N, 6) int64)."""
    total = int(np.prod(SPRITE_FACTOR_SIZES))
    if not 0 <= n <= total:
        raise UserError(f"num_images={n}: the sprite grid has {total:,} images (0 = all of them)")
    index = np.arange(total) if n == 0 else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    classes = np.stack(np.unravel_index(index, SPRITE_FACTOR_SIZES), 1).astype(np.int64)
    return render_sprites(classes), classes


def make_color_grids(n, seed=0, size=30, num_classes=10):
    """ARC-style multi-colour grids: 1-4 filled rectangles (sides 2-8) of random colours 1..C-1 on background 0,
    about 93% background. Returns (N, size, size) uint8."""
    rng = np.random.default_rng(seed)
    grids = np.zeros((n, size, size), dtype=np.uint8)
    for grid in grids:
        for _ in range(rng.integers(1, 5)):
            h, w = rng.integers(2, 9, size=2)
            r, c = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            grid[r:r + h, c:c + w] = rng.integers(1, num_classes)
    return grids


def _npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_dsprites_npz(path, imgs, latents_classes):
    """The dSprites file layout: imgs, latents_classes, latents_values, metadata (a pickled dict); atomic."""
    metadata = dict(latents_names=SPRITE_FACTOR_NAMES, latents_sizes=np.array(SPRITE_FACTOR_SIZES),
                    description='procedural dSprites-like sprites (data.render_sprites)')
    write_atomic(path, _npz_bytes(imgs=imgs, latents_classes=latents_classes,
                                  latents_values=sprite_factor_values(latents_classes),
                                  metadata=np.array(metadata, dtype=object)))


def builtin_vae_data(kind, cache_dir, num_images, seed=0, log=print):
    """Write the built-in data once into cache_dir/vae/<kind>_<hash>.npz (keyed by the generator's settings) and
    return its path: 'sprites' as a dSprites npz, 'grids' as a grid npz. The .json beside it records the recipe and
    the npz's sha256; a file that fails it is written again, with one log line saying why."""
    if kind not in ('sprites', 'grids'):
        raise UserError(f"dataset_kind={kind!r}: expected 'sprites' or 'grids'")
    recipe = dict(kind=kind, version=SPRITE_GENERATOR_VERSION, num_images=num_images, seed=seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path, meta_path = (os.path.join(cache_dir, 'vae', f'{kind}_{key}.{ext}') for ext in ('npz', 'json'))
    meta, problem = read_cache_meta(meta_path, recipe=recipe)
    if meta:
        return path
    if problem:
        log(f"built-in {kind} {path}: written again: {problem}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == 'sprites':
        write_dsprites_npz(path, *make_sprites(num_images, seed))
    else:
        write_atomic(path, _npz_bytes(grids=make_color_grids(num_images or 10_000, seed)))
    write_cache_meta(meta_path, [path], recipe=recipe)  # last: marks done
    return path


def _read_arrays(path):
    """-> (images, factors or None, factor names or None) from an npz or HDF5 file, arrays as stored."""
    arrays, found = read_array_file(path, IMAGE_KEYS + FACTOR_KEYS + ('metadata',), 'data', pickled=('metadata',))
    names = [k for k in IMAGE_KEYS if k in arrays]
    if not names:
        kind = 'a dataset' if path.endswith(('.h5', '.hdf5')) else 'an array'
        raise UserError(f"{path}: no grid array; expected {kind} named one of {IMAGE_KEYS}, found {found}")
    factors = next((arrays[k] for k in FACTOR_KEYS if k in arrays), None)
    metadata = arrays.get('metadata')  # dSprites': a 0-d object array holding a dict, pickled by Python 2
    metadata = metadata[()] if isinstance(metadata, np.ndarray) and metadata.shape == () else None
    factor_names = None
    if isinstance(metadata, dict) and 'latents_names' in metadata:
        factor_names = [n.decode() if isinstance(n, bytes) else str(n) for n in metadata['latents_names']]
    return arrays[names[0]], factors, factor_names


def load_vae_data(path, num_classes=0):
    """Read categorical images: a dSprites npz (imgs, latents_classes, metadata) or a grid npz/HDF5 (`grids` or
    `imgs` (N, H, W) integer class ids, optional `factors` (N, K) int). num_classes = 0: one more than the largest
    id, which must then be dense: the classes may not outnumber twice the distinct ids (more than half of them
    unused). Returns (images (N, H, W) uint8 or int64, factors (N, K) int64 or None, factor names, num_classes)."""
    if not os.path.isfile(path):
        raise UserError(f"data {path}: no such file (expected an .npz or .h5 of (N, H, W) class ids)")
    try:
        images, factors, names = _read_arrays(path)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise UserError(f"data {path}: cannot read it as .npz or HDF5 ({type(e).__name__}: {e})") from None
    if images.ndim != 3 or images.shape[0] == 0:
        raise UserError(f"data {path}: the grid array has shape {images.shape}; expected (N, H, W) with N >= 1")
    if images.dtype != bool and images.dtype.kind not in 'iu':
        raise UserError(f"data {path}: the grid array has dtype {images.dtype}; expected integer class ids")
    low, high = int(images.min()), int(images.max())
    if low < 0:
        raise UserError(f"data {path}: class id {low} is negative; expected ids in [0, num_classes)")
    if num_classes and high >= num_classes:
        raise UserError(f"data {path}: class id {high} >= num_classes={num_classes}; expected ids in "
                        f"[0, {num_classes}) (raise num_classes, or 0 = from the data)")
    if not num_classes and high >= 2:  # classes from the data: a stray id must not make thousands of empty ones
        used = np.unique(images)  # ~40 ms for 10,000 30x30 grids (numpy counts small integer types)
        if high + 1 > 2 * len(used):
            shown = ', '.join(map(str, used[:8])) + (', ...' if len(used) > 8 else '')
            raise UserError(f"data {path}: class ids must be dense (0..C-1) when num_classes=0, but only {len(used)} "
                            f"distinct ids occur ({shown}), up to {high}: {high + 1:,} classes, most of them unused; "
                            f"remap the ids to 0..{len(used) - 1}, or set num_classes={high + 1} to keep them")
    num_classes = num_classes or max(high + 1, 2)
    if factors is not None:
        if factors.ndim != 2 or factors.shape[0] != images.shape[0] or factors.dtype.kind not in 'iu':
            raise UserError(f"data {path}: factors have shape {factors.shape} and dtype {factors.dtype}; expected "
                            f"({images.shape[0]}, K) integers, one row per image")
        factors = factors.astype(np.int64)
    images = images.astype(np.uint8 if num_classes <= 256 else np.int64, copy=False)
    return images, factors, names, num_classes


def pad_images(images):
    """Pad (N, H, W) grids at the bottom/right with class 0 to the next square side the VAE takes (a multiple
    of 16). Returns (padded (N, S, S), mask (S, S) float32: 1 on real pixels, 0 on padding)."""
    n, h, w = images.shape
    side = 16 * math.ceil(max(h, w) / 16)
    mask = np.zeros((side, side), dtype=np.float32)
    mask[:h, :w] = 1.0
    if (h, w) == (side, side):
        return images, mask
    padded = np.zeros((n, side, side), dtype=images.dtype)
    padded[:, :h, :w] = images
    return padded, mask


# pictures --------------------------------------------------------------------
ARC_PALETTE = ['000000', '0074D9', 'FF4136', '2ECC40', 'FFDC00', 'AAAAAA', 'F012BE', 'FF851B', '7FDBFF', '870C25']


def palette(num_classes):
    """(C, 3) uint8: a fixed colour per class (the ARC colours for 0..9, then fixed pseudo-random colours)."""
    colours = [[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in ARC_PALETTE]
    extra = np.random.default_rng(0).integers(40, 256, size=(max(num_classes - 10, 0), 3)).tolist()
    return np.array((colours + extra)[:num_classes], dtype=np.uint8)


def tile_images(rows, colours, scale=2, gap=2):
    """rows: list of lists of (H, W) class-id images -> one RGB picture (grey gaps between tiles), each pixel
    scale x scale."""
    h, w = rows[0][0].shape
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) + gap, n_cols * (w + gap) + gap, 3), 128, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = gap + i * (h + gap), gap + j * (w + gap)
            out[top:top + h, left:left + w] = colours[image]
    return out.repeat(scale, 0).repeat(scale, 1)


def png_bytes(rgb):
    """An (H, W, 3) uint8 array as a PNG file: 8-bit RGB, no filter, one zlib IDAT chunk (standard library)."""
    h, w, _ = rgb.shape
    raw = b''.join(b'\x00' + rgb[y].tobytes() for y in range(h))  # filter type 0 before each scanline

    def chunk(kind, payload):
        return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))
    header = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)  # width, height, bit depth 8, colour type 2 (RGB)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw, 6)) + chunk(b'IEND', b'')


if __name__ == '__main__':  # the preprocessing step alone: python data.py audio --manifest=labels.csv --splits=train
    from common import configure
    if sys.argv[1:2] != ['audio']:
        raise SystemExit("usage: python data.py audio (--manifest=labels.csv [--audio_root=wavs/] | --data=waves.npz) "
                         "[--splits=train,val,test] [--skip_existing=True] [--cache_dir=cache] [--n_mels=64 ...]")
    keys = dict(manifest='', audio_root='', data='', cache_dir='cache', splits='train,val,test', skip_existing=True,
                label_map=AUDIO_RECIPE['label_map'], **AUDIO_FEATURES)
    args = configure(keys, sys.argv[2:], usage='data.py audio (--manifest=FILE.csv | --data=FILE.npz) [--key=value ...]')
    paths, left_out = prepare_audio_cache(args['cache_dir'], {k: args[k] for k in AUDIO_FEATURES}, args['label_map'],
                                          args['manifest'], args['audio_root'], args['data'],
                                          args['splits'].split(','), args['skip_existing'])
    print(f"{left_out} clips of classes outside label_map left out; caches: {paths}")
