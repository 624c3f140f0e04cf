"""Datasets: IDX parsing with exact failures, Fashion-MNIST preprocessing with known pixel values, image
folders in every layout, and strict DataConfig. Everything is tiny and written by the tests themselves,
except one check of the real Fashion-MNIST when the Debian package is installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from fpdm.build import build_dataset
from fpdm.config import DataConfig
from fpdm.data import images as data
from fpdm.data.images import ImageDataset, fashion_mnist, image_folder, read_idx
from fpdm.errors import UsageError


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def one_line_naming(info: pytest.ExceptionInfo[UsageError], *parts: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --------------------------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trips(tmp_path, name):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 5)
    assert torch.equal(out, torch.from_numpy(array))
    out[0, 0, 0] = 7  # writable, owns its memory


def test_read_idx_accepts_a_string_path_and_empty_arrays(tmp_path):
    path = write_idx(tmp_path / "empty-idx1-ubyte", np.zeros((0,), dtype=np.uint8))
    assert read_idx(str(path)).shape == (0,)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing-idx1-ubyte", None, "not found"),
        ("short-idx3-ubyte", idx_bytes(np.zeros((2, 3, 3)))[:-1], "payload bytes"),
        ("short-idx3-ubyte.gz", gzip.compress(idx_bytes(np.zeros((2, 3, 3)))[:-4]), "payload bytes"),
        ("long-idx1-ubyte", idx_bytes(np.zeros(4)) + b"\0", "payload bytes"),
        ("header-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0]), "truncated"),
        ("magic-idx1-ubyte", b"\x01\x00\x08\x01" + struct.pack(">i", 1) + b"\0", "bad magic"),
        ("tiny-idx1-ubyte", b"\x00", "bad magic"),
        ("type-idx1-ubyte", idx_bytes(np.zeros(2), type_code=0x0D), "type code 0x0D"),
        ("rank-idx1-ubyte", bytes([0, 0, 8, 0]), "rank 0"),
        ("negative-idx1-ubyte", bytes([0, 0, 8, 1]) + struct.pack(">i", -1), "negative dimension"),
        ("plain-idx1-ubyte.gz", idx_bytes(np.zeros(3)), "not valid gzip"),
        ("cut-idx1-ubyte.gz", gzip.compress(idx_bytes(np.zeros(300)))[:20], "not valid gzip"),
    ],
)
def test_read_idx_rejects_bad_files_naming_them(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        read_idx(path)
    one_line_naming(info, str(path), message)


def test_read_idx_rejects_a_directory(tmp_path):
    with pytest.raises(UsageError) as info:
        read_idx(tmp_path)
    one_line_naming(info, str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST on a fake IDX folder

N_FAKE = 20


@pytest.fixture
def fake_fmnist(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """20 train and 20 test images of 28x28 with known pixels (never 0 inside, so padding is recognisable)."""
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(N_FAKE, 28, 28), dtype=np.uint8)
    labels = (np.arange(N_FAKE) % 10).astype(np.uint8)
    for stem in ("train", "t10k"):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def scaled(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).to(torch.float32) / 255 * 2 - 1


def test_fashion_mnist_pads_28_to_32_keeping_pixels_exact(fake_fmnist):
    folder, images, labels = fake_fmnist
    ds = fashion_mnist(DataConfig(path=str(folder)))
    assert len(ds) == N_FAKE and ds.num_classes == 10 and ds.channels == 1 and ds.image_size == 32
    assert ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    for i in (0, 7, N_FAKE - 1):
        image, label = ds[i]
        assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
        assert isinstance(label, int) and label == labels[i]
        assert torch.equal(image[0, 2:30, 2:30], scaled(images[i]))
        border = torch.ones_like(image, dtype=torch.bool)
        border[:, 2:30, 2:30] = False
        assert torch.all(image[border] == -1.0)
    all_images, all_labels = ds.tensors()
    assert all_images.shape == (N_FAKE, 1, 32, 32) and all_labels.dtype == torch.int64
    assert torch.equal(all_labels, torch.from_numpy(labels).long())
    assert torch.equal(all_images[3], ds[3][0])


def test_fashion_mnist_items_are_copies(fake_fmnist):
    ds = fashion_mnist(DataConfig(path=str(fake_fmnist[0])))
    ds[0][0].fill_(5.0)
    ds.tensors()[0].fill_(5.0)
    assert ds[0][0].max() <= 1.0


def test_fashion_mnist_three_channels_repeat_gray(fake_fmnist):
    folder, images, _ = fake_fmnist
    ds = fashion_mnist(DataConfig(path=str(folder), channels=3))
    image, _ = ds[4]
    assert image.shape == (3, 32, 32) and ds.channels == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert torch.equal(image[2, 2:30, 2:30], scaled(images[4]))
    image.add_(1)  # a fresh tensor, not an expanded view
    assert ds.tensors()[0].shape == (N_FAKE, 3, 32, 32)


@pytest.mark.parametrize("size", [16, 29, 40])
def test_fashion_mnist_resizes_when_padding_cannot(fake_fmnist, size):
    folder, images, _ = fake_fmnist
    ds = fashion_mnist(DataConfig(path=str(folder), image_size=size, split="test"))
    image, _ = ds[0]
    assert image.shape == (1, size, size) and ds.image_size == size
    assert image.min() >= -1 and image.max() <= 1
    if size == 40:  # 40 - 28 is even: padded, not resized
        assert torch.equal(image[0, 6:34, 6:34], scaled(images[0]))
    else:  # resized: the mean brightness survives antialiased interpolation
        assert image.mean().item() == pytest.approx(scaled(images[0]).mean().item(), abs=0.05)


def test_fashion_mnist_unconditional_has_no_classes(fake_fmnist):
    ds = fashion_mnist(DataConfig(path=str(fake_fmnist[0]), class_conditional=False))
    assert ds.num_classes == 0 and ds.class_names == []
    assert {ds[i][1] for i in range(N_FAKE)} == {0}
    assert torch.equal(ds.tensors()[1], torch.zeros(N_FAKE, dtype=torch.int64))


def test_random_flip_uses_the_global_rng(fake_fmnist):
    folder, images, _ = fake_fmnist
    ds = fashion_mnist(DataConfig(path=str(folder), image_size=28, random_flip=True))
    original = scaled(images[0])
    seen = []
    for _ in range(40):
        image = ds[0][0][0]
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
        seen.append(torch.equal(image, original))
    assert 5 < sum(seen) < 35
    torch.manual_seed(3)
    first = [ds[0][0] for _ in range(8)]
    torch.manual_seed(3)
    assert all(torch.equal(a, ds[0][0]) for a in first)


def test_fashion_mnist_reads_uncompressed_files_too(fake_fmnist, tmp_path_factory):
    _, images, labels = fake_fmnist
    folder = tmp_path_factory.mktemp("raw")
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    assert len(fashion_mnist(DataConfig(path=str(folder)))) == N_FAKE


def test_fashion_mnist_mismatched_counts(fake_fmnist):
    folder, _, labels = fake_fmnist
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:-1])
    with pytest.raises(UsageError) as info:
        fashion_mnist(DataConfig(path=str(folder)))
    one_line_naming(info, "do not match", "train-labels-idx1-ubyte.gz")


def test_fashion_mnist_label_out_of_range(fake_fmnist):
    folder, _, labels = fake_fmnist
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels + 5)
    with pytest.raises(UsageError) as info:
        fashion_mnist(DataConfig(path=str(folder), split="test"))
    one_line_naming(info, "labels go up to 14")


def test_fashion_mnist_explicit_path_without_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download_fashion_mnist", pytest.fail)  # an explicit path never downloads
    with pytest.raises(UsageError) as info:
        fashion_mnist(DataConfig(path=str(tmp_path), split="test"))
    one_line_naming(info, str(tmp_path), "t10k-images-idx3-ubyte")


def test_fashion_mnist_default_folder_missing_and_offline(tmp_path, monkeypatch):
    def offline(*, train: bool):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(data, "_download_fashion_mnist", offline)
    with pytest.raises(UsageError) as info:
        fashion_mnist(DataConfig())
    one_line_naming(info, str(tmp_path / "absent"), "apt-get install dataset-fashion-mnist", "data.path")


def test_fashion_mnist_default_folder_missing_downloads(tmp_path, monkeypatch):
    calls = []

    def download(*, train: bool):
        calls.append(train)
        return torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2])

    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(data, "_download_fashion_mnist", download)
    ds = build_dataset(DataConfig(split="test"))
    assert calls == [False] and len(ds) == 3 and ds[2][1] == 2


REAL = Path(data.DEFAULT_FASHION_MNIST_DIR)


def test_real_fashion_mnist_when_installed():
    if not (REAL / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{REAL} not installed (Debian package dataset-fashion-mnist)")
    for split, count in (("train", 60000), ("test", 10000)):
        ds = build_dataset(DataConfig(split=split))
        images, labels = ds.tensors()
        assert len(ds) == count and images.shape == (count, 1, 32, 32)
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert images.min() == -1 and images.max() == 1


# --------------------------------------------------------------------------------------------------------------
# Image folders


def save(path: Path, color: int | tuple[int, int, int], *, size: tuple[int, int] = (12, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_labels_from_sorted_class_folders(tmp_path):
    save(tmp_path / "zebra" / "a.png", (255, 255, 255))
    save(tmp_path / "cat" / "b.PNG", (0, 0, 0))
    save(tmp_path / "cat" / "nested" / "c.jpg", (0, 0, 0))
    save(tmp_path / "dog" / "d.bmp", (128, 128, 128))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    save(tmp_path / ".hidden" / "e.png", (1, 2, 3))
    ds = image_folder(DataConfig(name="image_folder", path=str(tmp_path), image_size=8))
    assert ds.class_names == ["cat", "dog", "zebra"] and ds.num_classes == 3 and len(ds) == 4
    items = [ds[i] for i in range(4)]
    assert [label for _, label in items] == [0, 0, 1, 2]
    assert all(image.shape == (1, 8, 8) for image, _ in items)
    assert torch.all(items[0][0] == -1) and torch.all(items[3][0] == 1)
    unconditional = build_dataset(DataConfig(name="image_folder", path=str(tmp_path), class_conditional=False))
    assert unconditional.num_classes == 0 and {unconditional[i][1] for i in range(4)} == {0}


def test_image_folder_flat_is_unconditional(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", (10 * i, 0, 0))
    ds = build_dataset(DataConfig(name="image_folder", path=str(tmp_path), image_size=8, channels=3))
    assert len(ds) == 3 and ds.num_classes == 0 and ds.class_names == []
    image, label = ds[2]
    assert image.shape == (3, 8, 8) and label == 0


def test_image_folder_rgb_and_gray_conversion(tmp_path):
    save(tmp_path / "red.png", (255, 0, 0))
    rgb = image_folder(DataConfig(name="image_folder", path=str(tmp_path), image_size=8, channels=3))[0][0]
    assert torch.all(rgb[0] == 1) and torch.all(rgb[1] == -1) and torch.all(rgb[2] == -1)
    gray = image_folder(DataConfig(name="image_folder", path=str(tmp_path), image_size=8, channels=1))[0][0]
    luma = round(255 * 299 / 1000)  # PIL's ITU-R 601-2 "L" conversion of pure red
    assert gray.shape == (1, 8, 8) and torch.allclose(gray, torch.full_like(gray, luma / 255 * 2 - 1), atol=1 / 255)
    save(tmp_path / "gray.png", 200, mode="L")  # gray source asked for RGB: three equal channels
    both = image_folder(DataConfig(name="image_folder", path=str(tmp_path), image_size=8, channels=3))
    assert torch.equal(both[0][0][0], both[0][0][1])


def test_image_folder_center_crops_non_square(tmp_path):
    image = Image.new("L", (30, 10), 0)  # wide: black | white middle square | black
    image.paste(255, (10, 0, 20, 10))
    image.save(tmp_path / "wide.png")
    tall = Image.new("L", (10, 30), 255)
    tall.paste(0, (0, 10, 10, 20))
    tall.save(tmp_path / "tall.png")
    ds = image_folder(DataConfig(name="image_folder", path=str(tmp_path), image_size=8))
    assert torch.all(ds[0][0] == -1)  # sorted: tall.png first, its middle square is black
    assert torch.all(ds[1][0] == 1)  # wide.png: only the white middle survives the crop


@pytest.mark.parametrize(
    "layout, message",
    [
        ("empty", "no images found in"),
        ("only_text", "no images found in"),
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("mixed", "use one layout or the other"),
    ],
)
def test_image_folder_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "root"
    if layout == "file":
        root.write_text("x")
    elif layout != "missing":
        root.mkdir()
    if layout == "only_text":
        (root / "cls").mkdir()
        (root / "cls" / "a.txt").write_text("x")
    if layout == "mixed":
        save(root / "a.png", (0, 0, 0))
        save(root / "cls" / "b.png", (0, 0, 0))
    with pytest.raises(UsageError) as info:
        image_folder(DataConfig(name="image_folder", path=str(root)))
    one_line_naming(info, str(root), message)


def test_image_folder_needs_a_path():
    with pytest.raises(UsageError) as info:
        build_dataset(DataConfig(name="image_folder"))
    one_line_naming(info, "data.path is required")


@pytest.mark.parametrize("content", [np.random.default_rng(1).bytes(200), b""])
def test_image_folder_corrupt_image_names_the_file(tmp_path, content):
    save(tmp_path / "cls" / "good.png", (0, 0, 0))
    bad = tmp_path / "cls" / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(UsageError) as info:
        image_folder(DataConfig(name="image_folder", path=str(tmp_path)))
    one_line_naming(info, "cannot read image", str(bad))


def test_image_folder_truncated_png_names_the_file(tmp_path):
    save(tmp_path / "full.png", (0, 0, 0), size=(64, 64))
    bad = tmp_path / "cut.png"
    noisy = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(UsageError) as info:
        image_folder(DataConfig(name="image_folder", path=str(tmp_path)))
    one_line_naming(info, str(bad))


def test_load_image_scales_16_bit_gray_and_reads_every_mode_alike(tmp_path):
    """One conversion for every mode: 16-bit gray is scaled to 8 bits (PIL alone clips it at 255), a palette
    with transparency converts without a warning, and gray stored as RGB, as a palette or with alpha gives
    the same pixels as plain gray."""
    import warnings

    from fpdm.data.images import is_gray, load_image

    pixels = np.random.default_rng(3).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # exact 16-bit values
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(pixels).convert("LA").save(tmp_path / "la.png")
    palette = Image.fromarray(pixels).convert("P")
    palette.save(tmp_path / "p.png", transparency=bytes(range(256)))  # per-entry alpha: PIL warns on convert
    expected = load_image(tmp_path / "gray.png", 12, 1)
    assert torch.equal(expected[0], torch.from_numpy(pixels))  # same size: no resampling
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on palettes with transparency unless they are expanded first
        for name in ("wide", "rgb", "la", "p"):
            assert torch.equal(load_image(tmp_path / f"{name}.png", 12, 1), expected), name
            with Image.open(tmp_path / f"{name}.png") as image:
                assert is_gray(image), name
    assert torch.equal(load_image(tmp_path / "wide.png", 12, 3), expected.expand(3, -1, -1))
    Image.fromarray(np.stack([pixels, pixels, 255 - pixels], -1)).save(tmp_path / "color.png")
    with Image.open(tmp_path / "color.png") as image:
        assert not is_gray(image)


def test_unreadable_images_are_their_own_error(tmp_path):
    """Evaluation skips these and training refuses them; both tell them apart from other usage errors."""
    from fpdm.data.images import UnreadableImage, load_image

    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableImage) as info:
        load_image(tmp_path / "bad.png", 8, 1)
    assert isinstance(info.value, UsageError)
    one_line_naming(info, str(tmp_path / "bad.png"), "not an image format")


# --------------------------------------------------------------------------------------------------------------
# ImageDataset and DataConfig


def test_image_dataset_rejects_bad_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 8, 8), image_size=8, channels=1)
    with pytest.raises(ValueError, match="channel"):
        ImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), image_size=8, channels=1)
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 2]), image_size=8, channels=1,
                     class_names=["a", "b"])  # fmt: skip


def test_data_config_defaults_and_frozen():
    config = DataConfig()
    assert (config.name, config.path, config.split, config.image_size, config.channels) == (
        "fashion_mnist", None, "train", 32, 1,
    )  # fmt: skip
    assert config.class_conditional is True and config.random_flip is False
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.name = "image_folder"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name": "cifar10"}, ValueError),
        ({"split": "val"}, ValueError),
        ({"channels": 2}, ValueError),
        ({"channels": 3.0}, TypeError),
        ({"image_size": 4}, ValueError),
        ({"image_size": 32.0}, TypeError),
        ({"path": 3}, TypeError),
        ({"class_conditional": 1}, TypeError),
        ({"random_flip": "yes"}, TypeError),
    ],
)
def test_data_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error):
        DataConfig(**kwargs)


def test_a_data_loader_batches_items(fake_fmnist):
    ds = fashion_mnist(DataConfig(path=str(fake_fmnist[0]), channels=3, random_flip=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64
