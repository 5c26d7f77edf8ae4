"""Tests for ti_flax.data.images: listing, decoding, orientation, crop and resize, SDXL size ids."""

import warnings

import numpy as np
import pytest
from PIL import Image

from ti_flax.data import images
from ti_flax.errors import UserError


def load(directory, res=8, center_crop=False, interpolation="nearest"):
    """(images, names) of a folder, as load_image_set decodes them."""
    loaded, names, _ = images.load_image_set(str(directory), res, center_crop, interpolation)
    return loaded, names


def test_modes_convert_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent black must become white
    rgba.save(tmp_path / "a_rgba.png")
    Image.new("L", (4, 4), 100).save(tmp_path / "b_l.png")
    Image.new("LA", (4, 4), (50, 0)).save(tmp_path / "c_la.png")
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "d_p.png", transparency=0)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "e_cmyk.tif")
    gray16 = np.zeros((4, 4), dtype=np.uint16)
    gray16[0, :] = 65535
    gray16[1, :] = 32768
    Image.fromarray(gray16).save(tmp_path / "f_gray16.png")
    assert Image.open(tmp_path / "f_gray16.png").mode == "I;16"

    pixels, names = load(tmp_path, res=4)
    assert names == ["a_rgba.png", "b_l.png", "c_la.png", "d_p.png", "e_cmyk.tif", "f_gray16.png"]
    assert pixels.shape == (6, 4, 4, 3) and pixels.dtype == np.uint8
    rgba_, l_, la_, p_, cmyk_, g16 = pixels
    assert rgba_[0, 0].tolist() == [255, 255, 255] and rgba_[1, 1].tolist() == [255, 0, 0]
    assert (l_ == 100).all()
    assert (la_ == 255).all()  # fully transparent gray over white
    assert p_[0, 0].tolist() == [255, 255, 255] and p_[1, 1].tolist() == [0, 255, 0]
    assert cmyk_[0, 0].tolist() == [255, 0, 0]
    assert (g16[0] == 255).all() and (g16[1] == 128).all() and (g16[2] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 tall, left half red; Orientation=6 means "rotate 90 degrees clockwise
    # to display", so the upright picture is 20 wide x 40 tall with red on top.
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    for center_crop in (False, True):
        (im,), _ = load(tmp_path, res=8, center_crop=center_crop)
        assert im[1, 4, 0] > 200 and im[1, 4, 2] < 60  # top: red
        assert im[6, 4, 2] > 200 and im[6, 4, 0] < 60  # bottom: blue


def test_center_crop_and_odd_sizes(tmp_path):
    # 37 wide x 53 tall: a red band at the top and bottom 8 rows, green in between.
    a = np.zeros((53, 37, 3), dtype=np.uint8)
    a[:, :, 1] = 255
    a[:8] = a[-8:] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "odd.png")
    (cropped,), _ = load(tmp_path, res=16, center_crop=True)
    (squashed,), _ = load(tmp_path, res=16, center_crop=False)
    assert cropped.shape == squashed.shape == (16, 16, 3)
    # The central 37x37 square (rows 8..44) is all green; squashing keeps the red bands.
    assert (cropped == [0, 255, 0]).all()
    assert (squashed[0] == [255, 0, 0]).all() and (squashed[-1] == [255, 0, 0]).all()


def test_time_ids_are_each_files_size_and_its_crop(tmp_path):
    # SDXL's (original height, width, crop top, left, target height, width) of each image: the
    # size of the picture as shown (EXIF orientation applied), and the crop counted in the image
    # scaled so its short side is the target (16), as SDXL's pipelines and scripts build them.
    for name, (width, height) in {"a_wide.png": (60, 40), "b_tall.png": (30, 90), "c_square.png": (50, 50),
                                  "d_odd.png": (37, 53)}.items():
        Image.new("RGB", (width, height), (200, 30, 30)).save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 tall, shown 20 wide x 40 tall
    Image.new("RGB", (40, 20), (0, 0, 255)).save(tmp_path / "e_rotated.jpg", exif=exif)
    _, names, squashed = images.load_image_set(str(tmp_path), 16, False, "bilinear")
    _, _, cropped = images.load_image_set(str(tmp_path), 16, True, "bilinear")
    assert names == ["a_wide.png", "b_tall.png", "c_square.png", "d_odd.png", "e_rotated.jpg"]
    assert squashed.dtype == cropped.dtype == np.float32
    sizes = [[40, 60], [90, 30], [50, 50], [53, 37], [40, 20]]
    np.testing.assert_array_equal(squashed, [[*size, 0, 0, 16, 16] for size in sizes])
    # Scaled: a 24x16 (crop left (24-16)/2 = 4), b 16x48 (top 16), d 16x22.9 (top 3.46 -> 3), e 16x32 (top 8).
    crops = [[0, 4], [16, 0], [0, 0], [3, 0], [8, 0]]
    np.testing.assert_array_equal(cropped, [[*size, *crop, 16, 16] for size, crop in zip(sizes, crops)])
    np.testing.assert_array_equal(images.size_and_crop_ids((40, 60), (0, 4), (16, 16)), cropped[0])


def test_interpolations_use_their_filter(tmp_path):
    # A textured image: each filter gives different pixels, and each must be PIL's own resize
    # with that filter (a flat colour would come out the same whatever the filter).
    texture = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    Image.fromarray(texture).save(tmp_path / "x.png")
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
    assert set(filters) == set(images.RESAMPLING)
    results = {}
    for name, resample in filters.items():
        (got,), _ = load(tmp_path, res=7, interpolation=name)
        want = np.asarray(Image.fromarray(texture).resize((7, 7), resample=resample))
        np.testing.assert_array_equal(got, want, err_msg=name)
        results[name] = got.tobytes()
    assert len(set(results.values())) == len(filters)


def test_unknown_interpolation(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(UserError, match="interpolation"):
        load(tmp_path, interpolation="area")


def test_non_images_skipped_with_one_warning(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "b.JPG")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "sub.png").mkdir()
    with pytest.warns(UserWarning) as record:
        pixels, names = load(tmp_path)
    assert names == ["a.png", "b.JPG"] and len(pixels) == 2
    assert len(record) == 1
    message = str(record[0].message)
    assert all(n in message for n in (".DS_Store", "a.txt", "sub.png"))


def test_no_warning_when_all_images(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tmp_path)


def test_broken_image_names_the_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(UserError, match="broken.png") as e:
        load(tmp_path)
    assert "\n" not in str(e.value) and "re-save" in str(e.value)


def test_truncated_image_names_the_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.jpg")
    raw = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cut.jpg"):
        load(tmp_path)


def test_empty_missing_and_file_paths(tmp_path):
    with pytest.raises(UserError, match="no images"):
        load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        load(tmp_path / "f.png")


def test_only_non_images_is_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("caption")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no images"):
        load(tmp_path)
