"""Latent datasets in the official feature format, training on them, `fpdm encode`, and `fpdm sample --vae`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fpdm.build import build_dataset
from fpdm.config import DataConfig
from fpdm.data.images import ImageDataset
from fpdm.data.latents import LatentDataset
from fpdm.errors import UsageError
from fpdm.io.checkpoint import load_checkpoint
from fpdm.io.vae_weights import save_vae
from fpdm.models.vae import AutoencoderKL, VAEConfig
from support import REGISTRY, one_line_error, run_cli, tiny_config

LATENT = ("data.name=latents", "data.channels=4", "data.image_size=8")


def write_latents(root, n=12, *, name="tiny256", shape=(1, 4, 8, 8), classes=3, seed=0):  # type: ignore[no-untyped-def]
    """The official layout: ROOT/<name>_features/<i>.npy (1, 4, H, W) float32, <name>_labels/<i>.npy (1,) int64."""
    rng = np.random.default_rng(seed)
    (root / f"{name}_features").mkdir(parents=True)
    (root / f"{name}_labels").mkdir()
    latents = rng.standard_normal((n, *shape)).astype(np.float32)
    for i in range(n):
        np.save(root / f"{name}_features" / f"{i}.npy", latents[i])
        np.save(root / f"{name}_labels" / f"{i}.npy", np.array([i % classes], dtype=np.int64))
    return latents


def latent_config(path, **kwargs) -> DataConfig:  # type: ignore[no-untyped-def]
    return DataConfig(name="latents", path=str(path), channels=4, image_size=8, **kwargs)


def test_reads_the_official_layout(tmp_path):
    latents = write_latents(tmp_path)
    ds = build_dataset(latent_config(tmp_path))
    assert isinstance(ds, LatentDataset) and isinstance(ds, ImageDataset)
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (12, 4, 8, 3)
    assert ds.class_names == ["0", "1", "2"]
    images, labels = ds.tensors()
    np.testing.assert_array_equal(images.numpy(), latents[:, 0])  # as stored: no rescaling, no clipping
    assert labels.tolist() == [i % 3 for i in range(12)]
    image, label = ds[10]  # numeric order: 10.npy is item 10, not item 2
    np.testing.assert_array_equal(image.numpy(), latents[10, 0])
    assert label == 1
    same = build_dataset(latent_config(tmp_path / "tiny256_features"))  # the features folder itself also works
    assert torch.equal(same.tensors()[0], images)
    unconditional = build_dataset(latent_config(tmp_path, class_conditional=False))
    assert unconditional.num_classes == 0 and unconditional.tensors()[1].eq(0).all()


def test_info_file_gives_class_names_and_checks_the_scale(tmp_path):
    write_latents(tmp_path)
    info = tmp_path / "tiny256_info.json"
    info.write_text(json.dumps({"class_names": ["cat", "dog", "fox"], "scale_factor": 0.18215}))
    assert build_dataset(latent_config(tmp_path)).class_names == ["cat", "dog", "fox"]
    info.write_text(json.dumps({"class_names": [], "scale_factor": 0.13025}))
    with pytest.raises(UsageError, match="set data.scale_factor=0.13025"):
        build_dataset(latent_config(tmp_path))
    assert build_dataset(latent_config(tmp_path, scale_factor=0.13025)).num_classes == 3
    info.write_text(json.dumps({"class_names": ["cat", "dog"]}))
    with pytest.raises(UsageError, match="label 2 .* out of range for the 2 class names"):
        build_dataset(latent_config(tmp_path))


def _message(path, **config) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError) as exc:
        build_dataset(latent_config(path, **config))
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_bad_files_name_the_file(tmp_path):
    write_latents(tmp_path)
    features, labels = tmp_path / "tiny256_features", tmp_path / "tiny256_labels"
    np.save(features / "5.npy", np.zeros((1, 4, 16, 16), np.float32))
    assert "5.npy has shape (1, 4, 16, 16), expected (1, 4, 8, 8)" in _message(tmp_path)
    np.save(features / "5.npy", np.zeros((1, 4, 8, 8), np.int32))
    assert "5.npy holds int32; latents must be float" in _message(tmp_path)
    np.save(features / "5.npy", np.full((1, 4, 8, 8), np.nan, np.float32))
    assert "5.npy holds NaN" in _message(tmp_path)
    np.save(features / "5.npy", np.zeros((1, 4, 8, 8), np.float16))  # half precision is accepted
    assert build_dataset(latent_config(tmp_path)).tensors()[0].dtype == torch.float32
    np.save(labels / "3.npy", np.array([1.0]))
    assert "3.npy holds float64; a label must be an integer" in _message(tmp_path)
    np.save(labels / "3.npy", np.array([1, 2]))
    assert "3.npy has shape (2,); a label must be one integer" in _message(tmp_path)
    np.save(labels / "3.npy", np.array(-1))
    assert "labels must be >= 0" in _message(tmp_path)
    np.save(labels / "3.npy", np.array(1))  # shape () is fine
    (features / "7.npy").write_bytes(b"garbage")
    assert "cannot read" in _message(tmp_path) and "7.npy" in _message(tmp_path)


def test_mismatched_and_missing_sets(tmp_path):
    write_latents(tmp_path)
    (tmp_path / "tiny256_labels" / "4.npy").unlink()
    message = _message(tmp_path)
    assert "tiny256_features/4.npy has no partner in" in message and "matched by file name" in message
    assert "does not exist" in _message(tmp_path / "nope")
    assert "holds no <name>_features folder" in _message(tmp_path / "tiny256_labels")
    write_latents(tmp_path / "two", name="a")
    write_latents(tmp_path / "two", name="b")
    assert "several feature sets (a, b)" in _message(tmp_path / "two")
    (tmp_path / "empty" / "x_features").mkdir(parents=True)
    assert "no matching labels folder" in _message(tmp_path / "empty")
    (tmp_path / "empty" / "x_labels").mkdir()
    assert "x_features holds no .npy files" in _message(tmp_path / "empty")
    assert "random_flip does not apply to latents" in _message(tmp_path, random_flip=True)
    with pytest.raises(UsageError, match="data.path is required"):
        build_dataset(DataConfig(name="latents", channels=4))


# --------------------------------------------------------------------------------------------------------------
# Training, encoding and sampling end to end (tiny and on CPU)


def test_training_on_latents_marks_the_checkpoint(tmp_path, trained):
    from fpdm.training.loop import train

    write_latents(tmp_path / "data", n=16)
    config = tiny_config(tmp_path / "data", tmp_path / "run", *LATENT, "train.steps=2", "train.ckpt_every=2")
    result = train(config, registry=REGISTRY, progress=False)
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt.spec["latent"] == {"scale_factor": 0.18215}
    assert ckpt.spec["options"]["in_channels"] == 4 and ckpt.spec["class_names"] == ["0", "1", "2"]
    assert "latent" not in load_checkpoint(trained).spec  # pixel models carry no latent entry


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), norm_num_groups=8, latent_channels=4))
    return save_vae(vae, tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture
def cli(capsys, monkeypatch):  # type: ignore[no-untyped-def]
    """`fpdm ARGS` in this process (a subprocess costs seconds of imports): a CompletedProcess-like result."""
    import subprocess

    from fpdm.apps.cli import main

    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


@pytest.mark.slow
def test_encode_train_sample_decode(images, vae_dir, tmp_path, cli):
    out = tmp_path / "latents"
    r = run_cli(
        "encode",
        str(images),
        str(out),
        "--vae",
        str(vae_dir),
        "--image-size",
        "16",
        "--batch-size",
        "5",
        "--name",
        "shapes",
        "--mean",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert "data.channels=4 --set data.image_size=8" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["shapes_features", "shapes_info.json", "shapes_labels"]
    files = sorted((out / "shapes_features").iterdir(), key=lambda p: int(p.stem))
    assert len(files) == 24 and np.load(files[0]).shape == (1, 4, 8, 8) and np.load(files[0]).dtype == np.float32
    assert np.load(out / "shapes_labels" / "23.npy").tolist() == [1]  # classes bright (0), dark (1) in order
    info = json.loads((out / "shapes_info.json").read_text())
    assert info["class_names"] == ["bright", "dark"] and info["scale_factor"] == 0.18215
    ds = build_dataset(latent_config(out))
    assert ds.class_names == ["bright", "dark"] and len(ds) == 24
    one_line_error(
        cli("encode", str(images), str(out), "--vae", str(vae_dir), "--name", "shapes"),
        "shapes_features already exists",
    )

    from fpdm.training.loop import train

    run = tmp_path / "run"
    train(tiny_config(out, run, *LATENT, "train.steps=2", "train.ckpt_every=2"), registry=REGISTRY, progress=False)
    samples = tmp_path / "samples"
    r = cli(
        "sample",
        str(run),
        "--vae",
        str(vae_dir),
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        str(samples),
        "--no-progress",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(samples / "images" / "000000.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB"  # decoded: 4x8x8 latents -> 3x16x16 pixels
    one_line_error(
        cli("sample", str(run), "--n", "1", "--steps", "2", "--out", str(tmp_path / "o")),
        "generates latents of shape (4, 8, 8)",
        "pass --vae DIR",
        "config.json",
    )
    three = save_vae(
        AutoencoderKL(VAEConfig(block_out_channels=(8,), norm_num_groups=8, latent_channels=3)), tmp_path / "vae3"
    )
    one_line_error(
        cli("sample", str(run), "--vae", str(three), "--n", "1", "--steps", "2"),
        "has 3 latent channels; this checkpoint generates 4",
    )


def test_vae_for_a_pixel_model_and_encode_errors(trained, images, vae_dir, tmp_path, cli):
    one_line_error(
        cli("sample", str(trained), "--vae", str(vae_dir), "--n", "1", "--steps", "2"),
        "--vae applies to latent models only",
    )
    one_line_error(cli("encode", str(images), str(tmp_path / "o")), "--vae is required")
    one_line_error(
        cli("encode", str(images), str(tmp_path / "o"), "--vae", str(tmp_path / "none")),
        "none does not exist",
        "config.json",
    )
    one_line_error(
        cli("encode", str(images), str(tmp_path / "o"), "--vae", str(vae_dir), "--image-size", "15"),
        "--image-size 15 must be a positive multiple of 2",
    )
    one_line_error(
        cli("encode", str(tmp_path / "nothing"), str(tmp_path / "o"), "--vae", str(vae_dir)), "nothing does not exist"
    )
    assert not (tmp_path / "o").exists()


def test_encode_folder_is_the_library_call_behind_fpdm_encode(images, vae_dir, tmp_path, cli):
    from fpdm.io.encode import encode_folder
    from fpdm.io.vae_weights import load_vae

    r = cli(
        "encode",
        str(images),
        str(tmp_path / "cli"),
        "--vae",
        str(vae_dir),
        "--image-size",
        "16",
        "--batch-size",
        "5",
        "--seed",
        "3",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    by_path = encode_folder(
        images, tmp_path / "api", vae=vae_dir, image_size=16, batch_size=5, seed=3, progress=False, device="cpu"
    )
    in_memory = encode_folder(
        images,
        tmp_path / "mem",
        vae=load_vae(vae_dir),
        image_size=16,
        batch_size=5,
        seed=3,
        name="shapes",
        sample=False,
        progress=False,
        device="cpu",
    )
    name = images.name
    assert by_path.features == tmp_path / "api" / f"{name}_features" and by_path.count == 24
    assert by_path.latent_shape == (4, 8, 8) and by_path.class_names == ["bright", "dark"]
    assert in_memory.features.name == "shapes_features"
    for i in (0, 17):  # the seeded Gaussian draws repeat exactly; the mean differs from a draw
        drawn = np.load(tmp_path / "cli" / f"{name}_features" / f"{i}.npy")
        np.testing.assert_array_equal(drawn, np.load(by_path.features / f"{i}.npy"))
        assert not np.array_equal(drawn, np.load(in_memory.features / f"{i}.npy"))
    info = json.loads((tmp_path / "mem" / "shapes_info.json").read_text())
    assert info["sample"] is False and "in memory" in info["vae"]
    with pytest.raises(UsageError, match="already exists"):  # refused before the VAE is even looked at
        encode_folder(images, tmp_path / "api", vae=tmp_path / "no-vae", progress=False)
