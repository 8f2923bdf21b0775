"""Image folders (DIR/train/<class>/*, DIR/test/<class>/*): decoding, resizing, bad files, and the cache."""
import builtins
import os

import numpy as np
import pytest
pytest.importorskip("PIL")  # absent on a bare GPU machine: skip, not a collection error
from PIL import Image

from gpucnn.data import DataError, datasets, load_image_folder, read_image
from gpucnn.data import images as image_io
from gpucnn.data.folder import folder_classes
from tests.colour_data import CLASSES, write_image_folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "user-cache"))


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(root, per_class_train=3, per_class_test=2, size=20)
    return root


def test_classes_sorted_labels_follow_them_and_png_jpeg_both_decode(photos):
    train = load_image_folder(photos, "train", image_size=16)
    assert train.classes == tuple(sorted(CLASSES)) == folder_classes(photos)
    assert train.images.shape == (12, 3, 16, 16) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert not train.from_cache and train.skipped == []
    suffixes = {p.suffix for p in (photos / "train").rglob("*.*")}
    assert suffixes == {".png", ".jpg"}
    # red classes are red on average, blue classes blue (JPEG is lossy, the colours survive)
    for label, name in enumerate(train.classes):
        mean_rgb = train.images[train.labels == label].reshape(-1, 3, 256).mean(axis=(0, 2))
        red, blue = mean_rgb[0], mean_rgb[2]
        assert (red > blue) == name.startswith("red"), (name, mean_rgb)
    test = load_image_folder(photos, "test", image_size=16)
    assert test.images.shape == (8, 3, 16, 16) and test.classes == train.classes


def test_resize_keeps_the_centre_of_a_wide_image(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, 10:20] = 255           # a white centre third between black sides
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = read_image(tmp_path / "wide.png", size=10)
    assert out.shape == (3, 10, 10)
    assert out.min() >= 250          # the centre 10x10 crop of a 10-high image is the white band


def test_grey_palette_and_rgba_images_convert(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "palette.png")
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgb).save(tmp_path / "bitmap.bmp")
    as_rgb = read_image(tmp_path / "grey.png")
    assert as_rgb.shape == (3, 8, 8) and (as_rgb == grey).all()        # grey -> three equal planes
    assert read_image(tmp_path / "grey.png", grey=True).shape == (1, 8, 8)
    for name in ("palette.png", "alpha.png", "bitmap.bmp"):
        out = read_image(tmp_path / name)
        assert out.shape == (3, 8, 8) and abs(int(out[0].mean()) - 200) <= 2 and out[1:].max() <= 2, name
    assert read_image(tmp_path / "palette.png", grey=True).shape == (1, 8, 8)


def test_grey_flag_gives_one_channel(photos):
    train = load_image_folder(photos, "train", image_size=12, grey=True)
    assert train.images.shape == (12, 1, 12, 12)


def break_one(photos):
    bad = photos / "train" / "blue-cross" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:60])    # a truncated JPEG
    (photos / "train" / "blue-cross" / "notes.txt").write_text("not an image, ignored")
    return bad


def test_a_corrupt_image_is_one_error_naming_it(photos):
    bad = break_one(photos)
    with pytest.raises(DataError, match="--skip-bad-images") as info:
        load_image_folder(photos, "train", image_size=16)
    assert f"cannot read image {bad}" in str(info.value)


def test_skip_bad_images_leaves_them_out_and_counts_them(photos):
    bad = break_one(photos)
    train = load_image_folder(photos, "train", image_size=16, skip_bad_images=True)
    assert len(train.labels) == 11 and train.skipped == [str(bad.relative_to(photos))]
    assert np.bincount(train.labels).tolist() == [2, 3, 3, 3]
    again = load_image_folder(photos, "train", image_size=16, skip_bad_images=True)
    assert again.from_cache and again.skipped == train.skipped


def test_empty_class_folders(photos):
    (photos / "test" / "red-cross").rename(photos / "test-red-cross-moved")
    (photos / "test" / "red-cross").mkdir()               # an empty test class: allowed
    test = load_image_folder(photos, "test", image_size=16)
    assert 2 not in test.labels.tolist() and len(test.labels) == 6
    (photos / "train" / "zebra").mkdir()                   # an empty training class: an error
    with pytest.raises(DataError, match=r"class folder .*zebra holds no image files"):
        load_image_folder(photos, "train", image_size=16)


def test_layout_errors(tmp_path, photos):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "absent")
    with pytest.raises(DataError, match="no train/ sub-folder"):
        load_image_folder(photos / "train")
    (photos / "test" / "unicorn").mkdir()
    (photos / "test" / "unicorn" / "a.png").write_bytes((photos / "test" / "red-cross" / "000.png").read_bytes())
    with pytest.raises(DataError, match="unicorn that .* lacks"):
        load_image_folder(photos, "test", image_size=16)
    one = tmp_path / "one-class"
    (one / "train" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="needs at least 2"):
        load_image_folder(one)


def test_the_cache_is_used_and_a_changed_folder_is_noticed(photos, monkeypatch):
    first = load_image_folder(photos, "train", image_size=16)
    decoded = []
    real_read = image_io.read_image
    monkeypatch.setattr("gpucnn.data.folder.read_image",
                        lambda *a, **k: decoded.append(a[0]) or real_read(*a, **k))
    second = load_image_folder(photos, "train", image_size=16)
    assert second.from_cache and decoded == []
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)

    # another size or colour mode is another cache entry
    assert not load_image_folder(photos, "train", image_size=8).from_cache
    decoded.clear()

    # a changed file (same name, new pixels) is noticed
    changed = photos / "train" / "red-square" / "000.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = load_image_folder(photos, "train", image_size=16)
    assert not third.from_cache and len(decoded) == 12
    changed_index = 9      # red-square (label 3, the last class) 000.png follows 3 x 3 other images
    assert third.images[changed_index].max() == 0
    others = np.arange(12) != changed_index
    np.testing.assert_array_equal(third.images[others], first.images[others])

    # so are an added and a removed file
    (photos / "train" / "red-square" / "new.png").write_bytes(changed.read_bytes())
    assert len(load_image_folder(photos, "train", image_size=16).labels) == 13
    (photos / "train" / "blue-cross" / "000.png").unlink()
    fourth = load_image_folder(photos, "train", image_size=16)
    assert not fourth.from_cache and len(fourth.labels) == 12


def test_an_unwritable_cache_only_warns(photos, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(blocker))
    with pytest.warns(UserWarning, match="could not cache the decoded images"):
        train = load_image_folder(photos, "train", image_size=16)
    assert len(train.labels) == 12


def test_missing_pillow_says_how_to_install(photos, monkeypatch):
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(image_io.MissingPillowError, match=r"pip install 'gpucnn\[images\]'"):
        load_image_folder(photos, "train", image_size=16, use_cache=False)
