"""The image reader on real files: every case is written to disk with PIL and read back.

Each case where ``Image.open(p).convert("RGB")`` (the old reader, :func:`naive`) was wrong also
asserts that it was, so the test shows what changed; the property-based tests feed the reader
random bytes, truncated and mutated files and accept only an RGB image or one of ``UNREADABLE``.
"""
from __future__ import annotations

import gc
import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
import torch
from PIL import Image

from hymamba.data.datasets import ImageFolderDataset
from hymamba.data.images import UNREADABLE, UnreadableImageError, load_image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: PIL warns about the corrupt files these feed it; the tests care about what it raises
FUZZ_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def naive(path: Path) -> np.ndarray:
    """The old reader: PIL's plain conversion."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def gradient(h: int = 64, w: int = 256) -> np.ndarray:
    """A smooth RGB picture with a distinct colour in each corner."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([255 * x / (w - 1), 255 * y / (h - 1), 255 - 200 * x / (w - 1)], -1).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# high bit depth


def _gray16() -> np.ndarray:
    return np.linspace(0, 65535, 64 * 256).round().astype(np.uint16).reshape(64, 256)


def _save_i16_png(path: Path, v: np.ndarray) -> None:
    Image.fromarray(v).save(path)  # mode I;16


def _save_i16_tiff(path: Path, v: np.ndarray) -> None:
    Image.fromarray(v).save(path)


def _save_i16b_tiff(path: Path, v: np.ndarray) -> None:
    Image.frombytes("I;16B", (v.shape[1], v.shape[0]), v.astype(">u2").tobytes()).save(path)


def _save_i32_tiff(path: Path, v: np.ndarray) -> None:
    Image.fromarray(v.astype(np.int32)).save(path)  # mode I


@pytest.mark.parametrize("name, save, mode", [
    ("g.png", _save_i16_png, "I;16"), ("g.tif", _save_i16_tiff, "I;16"), ("gb.tif", _save_i16b_tiff, "I;16B"),
    ("g32.tif", _save_i32_tiff, "I"),
])
def test_16bit_grayscale_uses_the_full_range(tmp_path: Path, name: str, save: Callable, mode: str) -> None:
    p = tmp_path / name
    v = _gray16()
    save(p, v)
    with Image.open(p) as img:
        assert img.mode == mode
    expected = np.floor(v.astype(np.float64) * 255 / 65535 + 0.5)
    got = read(p)
    assert got.shape == (64, 256, 3) and (got == got[..., :1]).all()  # gray
    assert np.array_equal(got[..., 0], expected)
    assert abs(got.mean() - 127.5) < 1  # the gradient spans 0..255
    old = naive(p)
    assert old.mean() > 250 and (old == 255).mean() > 0.99  # clipped: almost all white


def test_16bit_png_colour_key_transparency_is_white(tmp_path: Path) -> None:
    v = _gray16()
    v[:, :32] = 1234
    p = tmp_path / "key16.png"
    Image.fromarray(v).save(p, transparency=1234)
    got = read(p)
    assert (got[:, :32] == 255).all()
    assert abs(int(got[0, 100, 0]) - round(int(v[0, 100]) * 255 / 65535)) <= 1


def test_float_tiff_in_0_1_and_in_0_255(tmp_path: Path) -> None:
    unit = np.linspace(0, 1, 64 * 256, dtype=np.float32).reshape(64, 256)
    p = tmp_path / "unit.tif"
    Image.fromarray(unit, mode="F").save(p)
    got = read(p)
    assert np.array_equal(got[..., 1], np.rint(unit * 255))
    assert abs(got.mean() - 127.5) < 1
    assert naive(p).max() <= 1  # 0..1 read as 0..255: black

    wide = unit * 255
    wide[0, :3] = (np.nan, np.inf, -np.inf)
    wide[1, :2] = (-20, 300)
    p = tmp_path / "wide.tif"
    Image.fromarray(wide, mode="F").save(p)
    got = read(p)[..., 0]
    assert got[0, :3].tolist() == [0, 255, 0] and got[1, :2].tolist() == [0, 255]
    assert np.array_equal(got[2:], np.rint(wide[2:]))


def test_1bit_and_grayscale(tmp_path: Path) -> None:
    bits = (np.indices((16, 24)).sum(0) % 2).astype(bool)
    for name in ("bits.png", "bits.tif", "bits.bmp"):
        p = tmp_path / name
        Image.fromarray(bits).save(p)
        with Image.open(p) as img:
            assert img.mode == "1"
        got = read(p)
        assert np.array_equal(got[..., 2], np.where(bits, 255, 0)) and np.array_equal(got, naive(p))
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    p = tmp_path / "gray.png"
    Image.fromarray(gray).save(p)
    got = read(p)
    assert all(np.array_equal(got[..., c], gray) for c in range(3))


@pytest.mark.parametrize("name, fmt", [("camera.jpg", "MPO"), ("anim.gif", "GIF"), ("pages.tif", "TIFF")])
def test_multi_frame_files_give_the_first_frame(tmp_path: Path, name: str, fmt: str) -> None:
    """Cameras write multi-picture JPEGs (PIL: MPO); animations and multi-page TIFFs: frame 0."""
    frames = [Image.new("RGB", (16, 12), c) for c in ((0, 0, 0), (200, 200, 200), (90, 90, 90))]
    p = tmp_path / name
    frames[0].save(p, fmt, save_all=True, append_images=frames[1:])
    with Image.open(p) as img:
        assert img.format == fmt and img.n_frames == 3
    assert read(p).max() < 8


# ----------------------------------------------------------------------------------------------
# EXIF orientation

#: how a viewer shows stored pixels ``a`` (rows, cols, ...) for each EXIF orientation (EXIF 2.3, 4.6.4)
UPRIGHT: Dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _marked(h: int = 24, w: int = 40) -> np.ndarray:
    a = np.full((h, w, 3), 128, np.uint8)
    a[:8, :8] = (255, 0, 0)  # the stored top-left corner is red
    return a


def test_exif_rotated_jpeg_comes_out_as_a_viewer_shows_it(tmp_path: Path) -> None:
    p = tmp_path / "phone.jpg"
    Image.fromarray(_marked()).save(p, quality=95, exif=_exif(6))
    got = read(p)
    assert got.shape == (40, 24, 3)  # portrait
    assert np.abs(got[:6, -6:].astype(int) - (255, 0, 0)).max() < 40  # red is now top-right
    assert np.abs(got[:6, :6].astype(int) - 128).max() < 40
    old = naive(p)
    assert old.shape == (24, 40, 3) and old[2, 2, 0] > 200 and old[2, 2, 1] < 60  # still landscape


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(tmp_path: Path, orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    p = tmp_path / "o.png"  # lossless: exact pixels (PNG eXIf chunk)
    Image.fromarray(stored).save(p, exif=_exif(orientation))
    assert np.array_equal(read(p), UPRIGHT[orientation](stored))
    assert np.array_equal(naive(p), stored)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_keeps_the_pixels(tmp_path: Path) -> None:
    p = tmp_path / "badexif.jpg"
    Image.fromarray(_marked()).save(p, quality=95, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff garbage")
    assert read(p).shape == (24, 40, 3)


# ----------------------------------------------------------------------------------------------
# transparency: composited onto white


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # the old reader's conversion
def test_palette_png_with_transparent_index(tmp_path: Path) -> None:
    idx = np.zeros((8, 12), np.uint8)
    idx[:, 6:] = 1
    idx[:, 10:] = 2
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 255, 0, 200, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    p = tmp_path / "pal.png"
    img.save(p, transparency=bytes([0, 255, 128]))  # index 0 transparent, 2 half
    with Image.open(p) as check:
        assert check.mode == "P"
    got = read(p)
    assert (got[:, :6] == 255).all()  # was the palette's green
    assert (got[:, 6:10] == (200, 0, 0)).all()
    half = got[0, 11].astype(int)
    assert np.abs(half - (127, 127, 255)).max() <= 1
    old = naive(p)
    assert (old[:, :6] == (0, 255, 0)).all() and (old[:, 10:] == (0, 0, 255)).all()


def test_palette_png_single_transparent_index(tmp_path: Path) -> None:
    idx = np.zeros((8, 12), np.uint8)
    idx[:, 6:] = 1
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    p = tmp_path / "pal1.gif"
    img.save(p, transparency=0)
    got = read(p)
    assert (got[:, :6] == 255).all() and (got[:, 6:] == (10, 20, 30)).all()
    assert (naive(p)[:, :6] == 0).all()


def test_rgba_png_half_transparent(tmp_path: Path) -> None:
    a = np.zeros((8, 12, 4), np.uint8)  # left: fully transparent black (what editors store)
    a[:, 6:] = (0, 0, 255, 255)
    a[:, 11] = (0, 0, 0, 128)  # half-transparent black: mid gray
    p = tmp_path / "rgba.png"
    Image.fromarray(a, mode="RGBA").save(p)
    got = read(p).astype(int)
    assert (got[:, :6] == 255).all()
    assert (got[:, 6:11] == (0, 0, 255)).all()
    assert np.abs(got[:, 11] - 127).max() <= 1
    old = naive(p)
    assert (old[:, :6] == 0).all()
    assert (read(tmp_path / "rgba.png") != old).mean() > 0.4


def test_rgb_png_colour_key(tmp_path: Path) -> None:
    a = np.zeros((8, 12, 3), np.uint8)
    a[:, 6:] = (50, 60, 70)
    p = tmp_path / "key.png"
    Image.fromarray(a).save(p, transparency=(0, 0, 0))
    got = read(p)
    assert (got[:, :6] == 255).all() and (got[:, 6:] == (50, 60, 70)).all()
    assert (naive(p)[:, :6] == 0).all()


def test_la_png(tmp_path: Path) -> None:
    la = np.zeros((8, 12, 2), np.uint8)
    la[..., 0] = 40
    la[:, 4:8, 1] = 255
    la[:, 8:, 1] = 128
    p = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p)
    got = read(p).astype(int)
    assert (got[:, :4] == 255).all() and (got[:, 4:8] == 40).all()
    assert np.abs(got[:, 8:] - round((40 * 128 + 255 * 127) / 255)).max() <= 1
    assert (naive(p)[:, :4] == 40).all()


# ----------------------------------------------------------------------------------------------
# CMYK


def test_cmyk_jpeg_adobe_inverted(tmp_path: Path) -> None:
    """PIL (libjpeg) writes CMYK JPEGs the way Photoshop does: inverted, with an Adobe marker."""
    rgb = gradient()
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95)
    data = p.read_bytes()
    assert b"Adobe" in data
    with Image.open(p) as img:
        assert img.mode == "CMYK"
    got = read(p).astype(int)
    assert np.abs(got - rgb).mean() < 2 and np.abs(got - rgb).max() < 24  # JPEG tolerance
    # also with black ink (K), which PIL's own RGB -> CMYK never writes
    cmyk = np.asarray(Image.fromarray(rgb).convert("CMYK")).copy()
    k = np.linspace(0, 200, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
    cmyk[..., 3] = k
    p2 = tmp_path / "cmyk_k.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(p2, quality=95)
    expected = rgb * (255 - k[..., None].astype(float)) / 255
    assert np.abs(read(p2) - expected).mean() < 2


def _lut16_cmyk_profile(ink_to_rgb: Callable[[np.ndarray], np.ndarray], gamma: float = 2.2, grid: int = 9,
                        n: int = 4096) -> bytes:
    """A minimal ICC v2 CMYK printer profile (A2B0 only, lut16, PCS XYZ).

    Each ink's input curve gives ``u = (1 - v) ** gamma``; the CLUT (``grid`` points a side) holds the
    D50 XYZ of linear sRGB ``ink_to_rgb(u)`` (LittleCMS interpolates it; a 9-point grid is within a
    few levels of the exact mapping).
    """
    srgb_to_xyz_d50 = np.array([[0.436065, 0.385147, 0.143066], [0.222488, 0.716873, 0.060608],
                                [0.013916, 0.097076, 0.714096]])
    u = np.array(np.meshgrid(*[np.linspace(0, 1, grid)] * 4, indexing="ij")).reshape(4, -1).T  # first varies slowest
    xyz = ink_to_rgb(u) @ srgb_to_xyz_d50.T
    clut = np.clip(np.round(xyz * 32768), 0, 65535).astype(">u2")
    curve = np.round(65535 * (1 - np.linspace(0, 1, n)) ** gamma).astype(">u2")
    ident = np.array([0, 65535], ">u2")
    lut = (b"mft2" + bytes(4) + bytes([4, 3, grid, 0])
           + struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536) + struct.pack(">HH", n, 2)
           + np.tile(curve, 4).tobytes() + clut.tobytes() + np.tile(ident, 3).tobytes())
    wtpt = b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in (0.9642, 1.0, 0.8249)))
    tags = [(b"A2B0", lut), (b"wtpt", wtpt)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"prtrCMYKXYZ "
              + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0)
              + struct.pack(">3i", *(round(v * 65536) for v in (0.9642, 1.0, 0.8249))) + bytes(48))
    assert len(header) == 128
    return header + table + body


def _srgb_encode(lin: np.ndarray) -> np.ndarray:
    lin = np.clip(lin, 0, 1)
    return 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def test_cmyk_jpeg_with_embedded_icc_profile(tmp_path: Path) -> None:
    """Photoshop's CMYK JPEGs carry the ICC profile that says what the ink values mean."""
    pytest.importorskip("PIL.ImageCms")

    # this press's cyan ink absorbs green and its magenta absorbs red (the opposite of the usual)
    def press(u: np.ndarray) -> np.ndarray:  # u = (1 - ink) ** gamma for C, M, Y, K
        return np.stack([u[:, 1] * u[:, 3], u[:, 0] * u[:, 3], u[:, 2] * u[:, 3]], -1)

    icc = _lut16_cmyk_profile(press)
    rgb = gradient()
    p = tmp_path / "press.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95, icc_profile=icc)
    with Image.open(p) as img:
        assert img.mode == "CMYK" and img.info.get("icc_profile") == icc
        ink = np.asarray(img).astype(np.float64) / 255
    expected = _srgb_encode(press((1 - ink.reshape(-1, 4)) ** 2.2)).reshape(rgb.shape)
    got = read(p).astype(int)
    assert np.abs(got - expected).mean() < 1.5 and np.abs(got - expected).max() <= 6
    assert np.abs(got[..., 0] - rgb[..., 1]).mean() < 3  # red and green swapped, as the profile says
    old = naive(p).astype(int)
    assert np.abs(old - rgb).mean() < 2 and np.abs(old - expected).mean() > 40  # the profile ignored


def test_cmyk_with_a_broken_profile_falls_back(tmp_path: Path) -> None:
    rgb = gradient()
    p = tmp_path / "badicc.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95, icc_profile=b"not an ICC profile at all" * 8)
    assert np.abs(read(p).astype(int) - rgb).mean() < 2


# ----------------------------------------------------------------------------------------------
# unreadable files: one of UNREADABLE, never anything else


def _png_bytes(size=(16, 12), mode="RGB") -> bytes:
    b = io.BytesIO()
    Image.fromarray(gradient(size[1], size[0])).convert(mode).save(b, "PNG")
    return b.getvalue()


def _jpeg_bytes() -> bytes:
    b = io.BytesIO()
    Image.fromarray(gradient(12, 16)).save(b, "JPEG", quality=90, exif=_exif(6))
    return b.getvalue()


def _seed_files() -> Dict[str, bytes]:
    out = {".png": _png_bytes(), ".jpg": _jpeg_bytes()}
    for suffix, fmt, mode in ((".tif", "TIFF", "RGB"), (".bmp", "BMP", "RGB"), (".gif", "GIF", "P"),
                              (".webp", "WEBP", "RGBA")):
        b = io.BytesIO()
        Image.fromarray(gradient(12, 16)).convert(mode).save(b, fmt)
        out[suffix] = b.getvalue()
    return out


SEEDS = _seed_files()


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w x h`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data", [
    ("empty.jpg", b""), ("text.png", b"this is not an image"), ("half.png", _png_bytes()[:60]),
    ("half.jpg", _jpeg_bytes()[:300]), ("bomb.png", _bomb_png(100_000, 100_000)),
    ("eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
])
def test_unreadable_files(tmp_path: Path, name: str, data: bytes) -> None:
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(UNREADABLE):
        load_image(p)


def test_missing_file_and_folder_are_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UNREADABLE):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UNREADABLE):
        load_image(tmp_path)


def test_decoder_errors_become_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder error PIL does not wrap (here EOFError) is reported as one of UNREADABLE."""
    p = tmp_path / "ok.png"
    p.write_bytes(_png_bytes())

    def boom(self):
        raise EOFError("decoder gave up")

    monkeypatch.setattr(Image.Image, "load", boom)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", boom)
    with pytest.raises(UnreadableImageError, match="EOFError: decoder gave up"):
        load_image(p)


def _check(path: Path) -> None:
    try:
        img = load_image(path)
    except UNREADABLE:
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    assert getattr(img, "fp", None) is None


@FUZZ_WARNINGS
@pytest.mark.timeout(60)
@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(sorted(SEEDS)))
def test_random_bytes(tmp_path: Path, data: bytes, suffix: str) -> None:
    p = tmp_path / f"random{suffix}"
    p.write_bytes(data)
    _check(p)


@FUZZ_WARNINGS
@pytest.mark.timeout(60)
@FUZZ
@given(suffix=st.sampled_from(sorted(SEEDS)), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files(tmp_path: Path, suffix: str, cut: float) -> None:
    data = SEEDS[suffix]
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(data[: int(cut * len(data))])
    _check(p)


@FUZZ_WARNINGS
@pytest.mark.timeout(60)
@FUZZ
@given(suffix=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_files(tmp_path: Path, suffix: str, edits) -> None:
    data = bytearray(SEEDS[suffix])
    for where, value in edits:
        data[int(where * len(data))] = value
    p = tmp_path / f"mut{suffix}"
    p.write_bytes(bytes(data))
    _check(p)


def test_the_truncated_png_and_jpeg_seeds_fail_cleanly(tmp_path: Path) -> None:
    """Every cut of the PNG and JPEG seeds (a deterministic sweep beside the random ones)."""
    for suffix in (".png", ".jpg"):
        data = SEEDS[suffix]
        for n in range(0, len(data), max(1, len(data) // 97)):
            p = tmp_path / f"c{n}{suffix}"
            p.write_bytes(data[:n])
            _check(p)


# ----------------------------------------------------------------------------------------------
# no leaked files


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_file_handles_leak(tmp_path: Path) -> None:
    files = []
    for suffix, data in SEEDS.items():
        for label, content in (("ok", data), ("cut", data[: len(data) // 2]), ("bad", b"garbage" + data[7:])):
            p = tmp_path / f"{label}{suffix}"
            p.write_bytes(content)
            files.append(p)
    frames = [Image.fromarray(gradient(12, 16)).convert("P") for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].convert("RGB").save(tmp_path / "pages.tif", save_all=True, append_images=[f.convert("RGB") for f in frames[1:]])
    files += [tmp_path / "anim.gif", tmp_path / "pages.tif"]
    gc.collect()
    before = _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            for p in files:
                try:
                    img = load_image(p)
                    assert getattr(img, "fp", None) is None
                except UNREADABLE:
                    pass
        gc.collect()
    assert _open_fds() == before
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ----------------------------------------------------------------------------------------------
# end to end: through the training data set


def test_image_folder_reads_16bit_and_rotated_images(tmp_path: Path) -> None:
    root = tmp_path / "train"
    (root / "gray16").mkdir(parents=True)
    (root / "phone").mkdir()
    v = _gray16()
    Image.fromarray(v).save(root / "gray16" / "scan.png")
    Image.fromarray(_marked()).save(root / "phone" / "photo.jpg", quality=95, exif=_exif(6))

    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)

    ds = ImageFolderDataset(root, to_tensor)
    assert ds.class_names == ["gray16", "phone"]
    (scan, t0, bad0), (photo, t1, bad1) = ds[0], ds[1]
    assert (t0, t1) == (0, 1) and bad0 == bad1 == []
    expected = torch.from_numpy(np.floor(v.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8))
    assert scan.shape == (3, 64, 256) and torch.equal(scan[0], expected) and torch.equal(scan[2], expected)
    assert abs(scan.float().mean().item() - 127.5) < 1
    assert photo.shape == (3, 40, 24)  # upright (portrait), not as stored
    assert photo[0, :6, -6:].float().mean() > 200 and photo[1, :6, -6:].float().mean() < 50
    assert to_tensor(Image.open(root / "gray16" / "scan.png").convert("RGB")).float().mean() > 250  # old
