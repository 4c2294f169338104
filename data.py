"""
Every data format the scripts read, and the built-in data they fall back on. One banner per family.
Prepared data goes to cache/, keyed by a hash of what produced it, written atomically.
"""
import glob
import hashlib
import json
import os
import sys
import sysconfig

import numpy as np
import torch

from common import UserError, write_atomic

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
    paths = sorted(p for p in glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
                   if not ({'site-packages', 'test', 'tests', 'idle_test'} & set(os.path.relpath(p, root).split(os.sep))))
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
        raise UserError(f"dataset {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if not text:
        raise UserError(f"dataset {path} is empty")
    return text, {'source': os.path.abspath(path)}


def prepare_text(dataset, cache_dir, val_fraction=0.05):
    """Tokenize a corpus once into cache_dir/slm/<sha>/{train,val}.bin (uint8) + meta.json.
    dataset='' means the stdlib corpus. Re-prepared whenever the source text changes (the key is its sha256)."""
    text, provenance = stdlib_corpus() if not dataset else read_text_file(dataset)
    text = text.replace('\r\n', '\n')  # Windows line endings would otherwise become UNK + '\n'
    tokenizer = CharTokenizer()
    sha = hashlib.sha256(text.encode('utf-8')).hexdigest()
    key = hashlib.sha256(json.dumps([sha, tokenizer.to_dict(), val_fraction]).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, 'slm', key)
    meta_path = os.path.join(folder, 'meta.json')
    try:  # reuse the cache only if it is complete: meta.json readable, both token files of the recorded size
        with open(meta_path) as f:
            meta = json.load(f)
        if all(os.path.getsize(os.path.join(folder, f'{s}.bin')) == meta[f'{s}_tokens'] for s in ('train', 'val')):
            return folder, dict(meta, **provenance)  # the same text may come from another path this time
    except (OSError, ValueError, KeyError):
        pass  # missing, partial or corrupt: prepare it again (nothing else lives in this folder)
    ids = tokenizer.encode_array(text)
    n_train = int(len(ids) * (1 - val_fraction))  # contiguous split: no leakage between neighbouring windows
    os.makedirs(folder, exist_ok=True)
    write_atomic(os.path.join(folder, 'train.bin'), ids[:n_train].tobytes())
    write_atomic(os.path.join(folder, 'val.bin'), ids[n_train:].tobytes())
    meta = dict(provenance, sha256=sha, chars=len(text), unk_count=int((ids == UNK).sum()), dtype='uint8',
                train_tokens=n_train, val_tokens=len(ids) - n_train, tokenizer=tokenizer.to_dict())
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())  # written last: its presence marks completeness
    return folder, meta


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

    def __init__(self, n_windows, batch_size, seed, rank=0, world_size=1):
        if n_windows // world_size < batch_size:
            raise UserError(f"{n_windows} training windows cannot fill one batch of {batch_size} per rank "
                            f"on {world_size} rank(s): use a longer dataset, a smaller block_size or batch_size")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n_windows, batch_size, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # same permutation on every rank
        per_rank = self.n // self.world_size  # equal shards, so every rank starts each epoch at the same step
        return torch.randperm(self.n, generator=g).numpy()[:per_rank * self.world_size][self.rank::self.world_size]

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
