"""Tests for ti_flax.data: image decoding, templates, and the seeded batch iterator."""

import warnings

import numpy as np
import pytest
from PIL import Image

from ti_flax import data
from ti_flax.errors import UserError

def make_train_data(n=5, res=4, repeats=3, flip_p=0.5, seed=0, g=3, t=4):
    # Each image is a distinct horizontal ramp, so flips and identities are visible.
    ramp = np.arange(res, dtype=np.uint8)[None, :, None]
    images = np.stack([np.broadcast_to(ramp + 10 * i, (res, res, 3)) for i in range(n)])
    template_ids = np.arange(t * 2, dtype=np.int32).reshape(t, 2)
    return data.TrainData(images, template_ids, repeats, flip_p, seed, g)


def image_index(d, pixels):
    """Recovers which stored image (possibly flipped) each row of pixels is."""
    out = []
    for p in pixels:
        hits = [i for i, im in enumerate(d.images) if (p == im).all() or (p == im[:, ::-1]).all()]
        assert len(hits) == 1
        out.append(hits[0])
    return np.array(out)


def assert_batches_equal(a, b):
    a, b = ({k: v for k, v in (x if isinstance(x, dict) else x._asdict()).items() if v is not None} for x in (a, b))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ---- the iterator -------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
    a, b, c = make_train_data(seed=7), make_train_data(seed=7), make_train_data(seed=8)
    for s in range(12):
        assert_batches_equal(a.global_batch(s), b.global_batch(s))
    differs = [
        not np.array_equal(a.global_batch(s).pixel_values, c.global_batch(s).pixel_values)
        for s in range(12)
    ]
    assert any(differs)


def test_resume_equals_uninterrupted():
    d = make_train_data(seed=3)
    it = d.batches(0)
    uninterrupted = [next(it) for _ in range(17)]
    for s in (0, 4, 5, 11, 16):  # fresh objects: nothing but the step is carried over
        assert_batches_equal(make_train_data(seed=3).local_batch(s, 0, 1, 1), uninterrupted[s])
    resumed = make_train_data(seed=3).batches(9)
    for s in range(9, 17):
        assert_batches_equal(next(resumed), uninterrupted[s])


def test_global_batch_shapes_and_example_ids():
    d = make_train_data(g=3, res=4, t=4)
    b = d.global_batch(2)
    assert b.pixel_values.shape == (3, 4, 4, 3) and b.pixel_values.dtype == np.uint8
    assert b.input_ids.shape == (3, 2) and b.input_ids.dtype == np.int32
    np.testing.assert_array_equal(b.example_ids, [6, 7, 8])
    assert d.steps_per_epoch == (5 * 3) // 3


@pytest.mark.parametrize("procs,devs", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2), (8, 1)])
def test_local_shares_concatenate_to_global(procs, devs):
    d = make_train_data(n=4, repeats=6, g=8)
    for s in (0, 3, 5):
        shares = [d.local_batch(s, p, procs, devs) for p in range(procs)]
        per_dev = 8 // (procs * devs)
        for share in shares:
            assert share.pixel_values.shape == (devs, per_dev, 4, 4, 3)
            assert share.pixel_values.dtype == np.uint8
            assert share.input_ids.shape == (devs, per_dev, 2)
            assert share.input_ids.dtype == np.int32
            assert share.example_ids.shape == (devs, per_dev)
        flat = [{k: v.reshape(-1, *v.shape[2:]) for k, v in x._asdict().items() if v is not None} for x in shares]
        whole = {k: np.concatenate([x[k] for x in flat]) for k in flat[0]}
        assert_batches_equal(whole, d.global_batch(s))


@pytest.mark.parametrize("procs,devs", [(1, 1), (1, 4), (2, 2)])
def test_each_example_carries_its_images_time_ids(procs, devs):
    # SDXL: every example's size and crop conditioning is that of the image it shows, in each
    # process's and device's share, for pixel and cached-latent batches alike.
    base = make_train_data(n=5, repeats=4, g=4)
    time_ids = np.arange(5 * 6, dtype=np.float32).reshape(5, 6) * 7 + 0.5
    d = data.TrainData(base.images, base.template_ids, 4, 0.5, 0, 4, time_ids=time_ids)
    mean = np.arange(5 * 2, dtype=np.float32).reshape(5, 2, 1, 1, 1)  # view [image, flip] holds 2 * image + flip
    latents = data.LatentViews(mean, -mean)
    for s in range(6):
        for p in range(procs):
            share = d.local_batch(s, p, procs, devs)
            assert share.time_ids.shape == (devs, 4 // (procs * devs), 6) and share.time_ids.dtype == np.float32
            shown = image_index(d, share.pixel_values.reshape(-1, 4, 4, 3))
            np.testing.assert_array_equal(share.time_ids.reshape(-1, 6), time_ids[shown])
            cached = d.local_batch(s, p, procs, devs, latents)
            shown = cached.latent_mean.reshape(-1).astype(int) // 2
            np.testing.assert_array_equal(cached.time_ids.reshape(-1, 6), time_ids[shown])
    assert base.global_batch(0).time_ids is None  # SD 1.x / 2.x batches carry none


def test_local_batch_rejects_indivisible_split():
    d = make_train_data(n=4, repeats=6, g=8)
    with pytest.raises(ValueError):
        d.local_batch(0, 0, 3, 1)
    with pytest.raises(ValueError):
        d.local_batch(0, 0, 2, 3)
    with pytest.raises(ValueError):
        d.local_batch(0, 2, 2, 1)


def test_every_slot_visited_once_per_epoch():
    d = make_train_data(n=5, repeats=3, g=5)  # 15 slots, 3 steps, nothing dropped
    for epoch in range(3):
        steps = range(epoch * d.steps_per_epoch, (epoch + 1) * d.steps_per_epoch)
        idx = np.concatenate([image_index(d, d.global_batch(s).pixel_values) for s in steps])
        np.testing.assert_array_equal(np.bincount(idx, minlength=5), [3] * 5)


def test_epochs_are_reshuffled():
    d = make_train_data(n=5, repeats=3, g=5)
    orders = [tuple(d.epoch_plan(e)[0]) for e in range(4)]
    assert len(set(orders)) > 1


def test_templates_are_drawn_from_all():
    d = make_train_data(n=5, repeats=20, g=5, t=4)
    ids = np.concatenate([d.global_batch(s).input_ids[:, 0] for s in range(20)])
    assert set(ids.tolist()) == {0, 2, 4, 6}


@pytest.mark.parametrize("flip_p,flipped", [(0.0, False), (1.0, True)])
def test_flip_probability_extremes(flip_p, flipped):
    d = make_train_data(flip_p=flip_p)
    for s in range(10):
        b = d.global_batch(s)
        image_idx, _, _ = d.epoch_plan(s // d.steps_per_epoch)
        pos = (s % d.steps_per_epoch) * d.global_batch_size
        for row, i in zip(b.pixel_values, image_idx[pos : pos + d.global_batch_size]):
            expected = d.images[i][:, ::-1] if flipped else d.images[i]
            np.testing.assert_array_equal(row, expected)


def test_flip_half_the_time():
    d = make_train_data(n=5, repeats=200, flip_p=0.5)
    _, flips, _ = d.epoch_plan(0)
    assert 0.4 < flips.mean() < 0.6


def test_batch_larger_than_epoch_is_user_error():
    with pytest.raises(UserError, match="larger than images x repeats"):
        make_train_data(n=2, repeats=1, g=3)


def test_stored_images_are_not_mutated_by_flips():
    d = make_train_data(flip_p=1.0)
    before = d.images.copy()
    for s in range(6):
        d.global_batch(s)
    np.testing.assert_array_equal(d.images, before)


# ---- templates and tokenization -----------------------------------------------------------


def test_templates():
    assert len(data.OBJECT_TEMPLATES) == 27 and len(data.STYLE_TEMPLATES) == 19
    assert data.templates_for("object")[0] == "a photo of a {}"
    assert data.templates_for("style")[0] == "a painting in the style of {}"
    assert all(t.count("{}") == 1 for t in data.OBJECT_TEMPLATES + data.STYLE_TEMPLATES)
    with pytest.raises(UserError):
        data.templates_for("person")


def test_tokenize_templates(clip_tokenizer):
    tok = clip_tokenizer
    tok.add_tokens(["<cat-toy>", "<cat-toy>_1"])
    cat = tok.convert_tokens_to_ids("<cat-toy>")
    cat1 = tok.convert_tokens_to_ids("<cat-toy>_1")
    assert tok("<cat-toy>", add_special_tokens=False).input_ids == [cat]
    ids = data.tokenize_templates(tok, data.OBJECT_TEMPLATES, "<cat-toy> <cat-toy>_1")
    assert ids.shape == (27, 77) and ids.dtype == np.int32
    assert (ids[:, 0] == 49406).all()
    assert ((ids == cat).sum(axis=1) == 1).all() and ((ids == cat1).sum(axis=1) == 1).all()
    # "a photo of a <cat-toy> <cat-toy>_1": BOS, 4 words, 2 placeholders, EOS, then padding.
    assert ids[0, 5:8].tolist() == [cat, cat1, 49407]


def test_tokenize_needs_a_max_length(tmp_path):
    from conftest import build_clip_tokenizer
    from transformers import CLIPTokenizer

    build_clip_tokenizer(tmp_path)
    # Built from vocab.json and merges.txt alone (tokenizer_config.json unread): model_max_length = 1e30.
    unset = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    with pytest.raises(UserError, match="model_max_length"):
        data.tokenize_templates(unset, data.STYLE_TEMPLATES, "<s>")


def test_tokenize_refuses_to_truncate_placeholders(clip_tokenizer):
    with pytest.raises(UserError, match="fewer vectors"):
        data.tokenize_templates(clip_tokenizer, ["a photo of {}"], " ".join(["cat"] * 80))


# ---- image loading ------------------------------------------------------------------------


def load(directory, res=8, center_crop=False, interpolation="nearest"):
    return data.load_images(str(directory), res, center_crop, interpolation)


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

    images, names = load(tmp_path, res=4)
    assert names == ["a_rgba.png", "b_l.png", "c_la.png", "d_p.png", "e_cmyk.tif", "f_gray16.png"]
    assert images.shape == (6, 4, 4, 3) and images.dtype == np.uint8
    rgba_, l_, la_, p_, cmyk_, g16 = images
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
    _, names, squashed = data.load_image_set(str(tmp_path), 16, False, "bilinear")
    _, _, cropped = data.load_image_set(str(tmp_path), 16, True, "bilinear")
    assert names == ["a_wide.png", "b_tall.png", "c_square.png", "d_odd.png", "e_rotated.jpg"]
    assert squashed.dtype == cropped.dtype == np.float32
    sizes = [[40, 60], [90, 30], [50, 50], [53, 37], [40, 20]]
    np.testing.assert_array_equal(squashed, [[*size, 0, 0, 16, 16] for size in sizes])
    # Scaled: a 24x16 (crop left (24-16)/2 = 4), b 16x48 (top 16), d 16x22.9 (top 3.46 -> 3), e 16x32 (top 8).
    crops = [[0, 4], [16, 0], [0, 0], [3, 0], [8, 0]]
    np.testing.assert_array_equal(cropped, [[*size, *crop, 16, 16] for size, crop in zip(sizes, crops)])
    np.testing.assert_array_equal(data.size_and_crop_ids((40, 60), (0, 4), (16, 16)), cropped[0])


def test_interpolations_use_their_filter(tmp_path):
    # A textured image: each filter gives different pixels, and each must be PIL's own resize
    # with that filter (a flat colour would come out the same whatever the filter).
    texture = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    Image.fromarray(texture).save(tmp_path / "x.png")
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
    assert set(filters) == set(data.INTERPOLATIONS)
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
        images, names = load(tmp_path)
    assert names == ["a.png", "b.JPG"] and len(images) == 2
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
