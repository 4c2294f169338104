"""train_vae.py's data: the procedural sprites (factor grid, shapes, foreground share), the dSprites npz and grid
npz/HDF5 loaders with their bad-input messages, padding, the built-in cache, and the PNG writer."""
import io
import math
import os
import pickle
import struct
import zipfile
import zlib

import h5py
import numpy as np
import pytest

from common import UserError
from data import (SPRITE_FACTOR_SIZES, builtin_vae_data, load_vae_data, make_color_grids, make_sprites, pad_images,
                  palette, png_bytes, render_sprites, sprite_factor_values, tile_images, write_dsprites_npz)


def test_sprite_factor_grid_is_dsprites_order():
    assert int(np.prod(SPRITE_FACTOR_SIZES)) == 737_280
    imgs, classes = make_sprites(300, seed=3)
    index = np.ravel_multi_index(classes.T, SPRITE_FACTOR_SIZES)
    assert imgs.shape == (300, 64, 64) and imgs.dtype == np.uint8 and set(np.unique(imgs)) <= {0, 1}
    assert (np.diff(index) > 0).all() and index[-1] < 737_280  # distinct, in grid order
    assert (classes.max(0) < SPRITE_FACTOR_SIZES).all() and (classes[:, 0] == 0).all()
    # row-major, posY fastest: grid index 1 is posY 1, index 32 is posX 1, index 1024 the second orientation
    unravel = lambda i: list(np.unravel_index(i, SPRITE_FACTOR_SIZES))  # noqa: E731
    assert unravel(1) == [0, 0, 0, 0, 0, 1] and unravel(32) == [0, 0, 0, 0, 1, 0] and unravel(1024)[3] == 1
    values = sprite_factor_values(np.array([[0, 2, 5, 39, 31, 31], [0, 0, 0, 0, 0, 0]]))
    assert np.allclose(values, [[1, 3, 1.0, 2 * np.pi, 1, 1], [1, 1, 0.5, 0, 0, 0]])  # both ends of every range


def test_sprite_shapes_and_foreground_share():
    square, ellipse, heart = render_sprites(np.array([[0, s, 5, 0, 0, 0] for s in range(3)]))
    assert square.sum() == 400  # |u|, |v| <= 10 at scale 1, centred on pixel corner 16
    assert square[6:26, 6:26].all() and square[5].sum() == 0
    assert abs(ellipse.sum() - math.pi * 13 * 7.2) < 0.04 * math.pi * 13 * 7.2
    assert ellipse[:, 16].sum() < ellipse[16].sum()  # long axis horizontal at orientation 0
    assert 150 < heart.sum() < 350 and heart[:16].sum() > heart[16:].sum()  # lobes on top (Y up)
    turned = render_sprites(np.array([[0, 1, 5, 10, 16, 16]]))[0]  # a quarter turn: the long axis is vertical
    rows, cols = np.nonzero(turned)
    assert np.ptp(rows) > np.ptp(cols)
    imgs, _ = make_sprites(2000, seed=1)
    assert 0.035 < imgs.mean() < 0.055  # dSprites: ~4.5% foreground pixels


def test_dsprites_npz_round_trip_and_grid_files(tmp_path):
    imgs, classes = make_sprites(50, seed=0)
    write_dsprites_npz(str(tmp_path / 'd.npz'), imgs, classes)
    got, factors, names, num_classes = load_vae_data(str(tmp_path / 'd.npz'))
    assert np.array_equal(got, imgs) and np.array_equal(factors, classes) and num_classes == 2
    assert names == ['color', 'shape', 'scale', 'orientation', 'posX', 'posY']
    grids = make_color_grids(40, seed=0)
    with h5py.File(tmp_path / 'g.h5', 'w') as f:
        f['grids'], f['factors'] = grids.astype(np.int32), np.arange(80).reshape(40, 2)
    got, factors, names, num_classes = load_vae_data(str(tmp_path / 'g.h5'), num_classes=12)
    assert np.array_equal(got, grids) and factors.shape == (40, 2) and names is None and num_classes == 12
    np.savez(tmp_path / 'g.npz', grids=grids)
    assert load_vae_data(str(tmp_path / 'g.npz'))[3] == int(grids.max()) + 1


class Python2Pickler(pickle._Pickler):
    """What Python 2's numpy wrote into dSprites' metadata: strings as STRING opcodes (Python 2 str, decoded with
    encoding='latin1' on load, array bytes included), numpy's helpers under numpy.core, protocol 2."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):  # not memoized: a str's encoded copy is short-lived
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else
                    pickle.BINSTRING + struct.pack('<i', len(obj))) + obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode('latin1'))

    def save_global(self, obj, name=None):
        module = {'numpy._core.multiarray': 'numpy.core.multiarray'}.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f'{module}\n{name or obj.__name__}\n'.encode())
        self.memoize(obj)

    dispatch[bytes], dispatch[str] = save_bytes, save_str


def test_python2_dsprites_metadata_loads_through_the_restricted_unpickler(tmp_path):
    """The real file's layout: a 0-d object array whose Python 2 pickle holds a dict of str, tuples and arrays."""
    imgs, classes = make_sprites(10, seed=0)
    metadata = dict(latents_names=('color', 'shape', 'scale', 'orientation', 'posX', 'posY'), version=1,
                    latents_sizes=np.array(SPRITE_FACTOR_SIZES), title='dSprites dataset',
                    latents_possible_values=dict(shape=np.array([1.0, 2.0, 3.0])))
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {'descr': '|O', 'fortran_order': False, 'shape': ()})
    Python2Pickler(member, protocol=2).dump(np.array(metadata, dtype=object))
    with zipfile.ZipFile(tmp_path / 'dsprites.npz', 'w') as z:
        for name, array in (('imgs', imgs), ('latents_classes', classes)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            z.writestr(f'{name}.npy', buffer.getvalue())
        z.writestr('metadata.npy', member.getvalue())
    images, factors, names, num_classes = load_vae_data(str(tmp_path / 'dsprites.npz'))
    assert names == list(metadata['latents_names']) and np.array_equal(images, imgs) and num_classes == 2


def test_color_grids_are_mostly_background():
    grids = make_color_grids(2000, seed=0)
    assert grids.shape == (2000, 30, 30) and grids.max() == 9
    assert 0.91 < (grids == 0).mean() < 0.95
    assert np.array_equal(grids, make_color_grids(2000, seed=0))


def test_padding_keeps_the_grid_and_masks_the_rest():
    grids = make_color_grids(5, seed=2)
    padded, mask = pad_images(grids)
    assert padded.shape == (5, 32, 32) and mask.shape == (32, 32) and mask.sum() == 900
    assert np.array_equal(padded[:, :30, :30], grids) and (padded[:, 30:] == 0).all() and mask[:30, :30].all()
    same, full = pad_images(np.zeros((2, 64, 64), np.uint8))
    assert same.shape == (2, 64, 64) and full.all()
    assert pad_images(np.zeros((1, 20, 40), np.uint8))[0].shape == (1, 48, 48)


@pytest.mark.parametrize('arrays, message', [
    (dict(images=np.zeros((3, 8, 8), np.uint8)), "no grid array; expected an array named one of ('imgs', 'grids'), "
                                                 "found ['images']"),
    (dict(grids=np.zeros((3, 8, 8), np.float32)), "dtype float32; expected integer class ids"),
    (dict(grids=np.full((3, 8, 8), -1, np.int64)), "class id -1 is negative"),
    (dict(grids=np.full((3, 8, 8), 5, np.int64)), "class id 5 >= num_classes=4"),
    (dict(grids=np.zeros((3, 8), np.uint8)), "shape (3, 8); expected (N, H, W)"),
    (dict(imgs=np.zeros((3, 8, 8), np.uint8), latents_classes=np.zeros((2, 6), np.int64)),
     "factors have shape (2, 6) and dtype int64; expected (3, K) integers"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, arrays, message):
    path = tmp_path / 'bad.npz'
    np.savez(path, **arrays)
    with pytest.raises(UserError) as e:
        load_vae_data(str(path), num_classes=4)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match='no such file'):
        load_vae_data(str(tmp_path / 'nope.npz'))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip file at all')
    with pytest.raises(UserError, match='cannot read it as .npz or HDF5'):
        load_vae_data(str(tmp_path / 'junk.npz'))
    with h5py.File(tmp_path / 'empty.h5', 'w') as f:
        f['labels'] = np.zeros(3)
    with pytest.raises(UserError, match=r"no grid array; expected a dataset named one of \('imgs', 'grids'\)"):
        load_vae_data(str(tmp_path / 'empty.h5'))


def test_builtin_cache_is_reused_and_repaired(tmp_path):
    path = builtin_vae_data('sprites', str(tmp_path), 64, seed=0)
    stamp = os.stat(path).st_mtime_ns
    assert builtin_vae_data('sprites', str(tmp_path), 64, seed=0) == path
    assert os.stat(path).st_mtime_ns == stamp  # reused, not rewritten
    assert builtin_vae_data('sprites', str(tmp_path), 65, seed=0) != path  # keyed by the settings
    with open(path, 'r+b') as f:
        f.truncate(100)
    assert builtin_vae_data('sprites', str(tmp_path), 64, seed=0) == path
    assert load_vae_data(path)[0].shape == (64, 64, 64)
    grid_path = builtin_vae_data('grids', str(tmp_path), 30, seed=0)
    assert load_vae_data(grid_path)[0].shape == (30, 30, 30)
    with pytest.raises(UserError, match="dataset_kind='faces'"):
        builtin_vae_data('faces', str(tmp_path), 10)


def decode_png(data):
    """A minimal PNG reader for the writer's output: every chunk's CRC checked, IDAT inflated, filters 0."""
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack('>I4s', data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        assert struct.unpack('>I', data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + payload)
        chunks[kind] = chunks.get(kind, b'') + payload
        pos += 12 + length
    w, h, depth, colour, _, _, _ = struct.unpack('>IIBBBBB', chunks[b'IHDR'])
    assert (depth, colour) == (8, 2) and chunks[b'IEND'] == b''
    raw = np.frombuffer(zlib.decompress(chunks[b'IDAT']), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_bytes_decode_to_the_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(png_bytes(rgb)), rgb)
    tiles = [[np.array([[0, 1], [2, 0]])], [np.array([[1, 1], [1, 1]])]]
    picture = decode_png(png_bytes(tile_images(tiles, palette(3), scale=3, gap=1)))
    assert picture.shape == (3 * 7, 3 * 4, 3)
    colours = palette(12)
    assert colours.shape == (12, 3) and np.array_equal(colours[:3], [[0, 0, 0], [0, 116, 217], [255, 65, 54]])
    assert np.array_equal(picture[3, 3], colours[0]) and np.array_equal(picture[3, 6], colours[1])
    assert np.array_equal(picture[6, 3], colours[2]) and np.array_equal(picture[0, 0], [128, 128, 128])
    assert np.array_equal(picture[12, 3], colours[1])
