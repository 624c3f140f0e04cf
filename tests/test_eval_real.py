"""`fpdm eval` on a real reference set: small photographs (tests/data/photos, public domain and CC0, see its
LICENSE.md) in class subfolders, of mixed sizes and modes (RGB, RGBA, palette, JPEG, gray, 16-bit gray, gray
stored as RGB, gray + alpha), with one truncated file. Both sides are converted exactly as training converts
images; a pixel model and a latent model (through its VAE) are evaluated against the photos.

The extractor is a seeded, untrained CNN with 4 features, so nine photos are enough for a full-rank covariance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fpdm.config import DataConfig
from fpdm.data.images import image_folder, to_uint8
from fpdm.errors import UsageError
from fpdm.eval.features import FmnistCNN, save_extractor
from fpdm.eval.inputs import load_folder
from support import REGISTRY, tiny_config

PHOTOS = Path(__file__).parent / "data" / "photos"
READABLE = 9  # ten files, one truncated
BROKEN = "textures/broken.png"


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("extractor") / "tiny4.safetensors"
    torch.manual_seed(0)
    model = FmnistCNN(widths=(4, 8, 8), features=4).eval()
    save_extractor(model, path, test_accuracy=0.1, test_images=0, train_steps=0)
    return path


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`fpdm ARGS` in this process: (exit code, stdout, stderr)."""
    from fpdm.apps.cli import main

    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent/torch-home")  # no Inception weights: offline as a fresh machine

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def readable_copy(root: Path) -> Path:
    """The photos without the truncated file: what training accepts (it refuses a folder with a corrupt file)."""
    copy = root / "photos"
    shutil.copytree(PHOTOS, copy)
    (copy / BROKEN).unlink()
    return copy


def test_the_photos_are_small_and_each_has_a_stated_license() -> None:
    files = sorted(p.relative_to(PHOTOS).as_posix() for p in PHOTOS.rglob("*") if p.is_file())
    images = [f for f in files if f.endswith((".png", ".jpg"))]
    assert len(images) == READABLE + 1 and {f.split("/")[0] for f in images} == {"scenes", "textures"}
    licenses = (PHOTOS / "LICENSE.md").read_text()
    for name in images:
        row = next(line for line in licenses.splitlines() if line.startswith(f"| {name} |"))
        assert "public domain" in row or "CC0" in row, row
    assert sum(p.stat().st_size for p in PHOTOS.rglob("*") if p.is_file()) < 100_000


def test_photos_load_as_training_converts_them(tmp_path: Path) -> None:
    """Every readable photo, converted by the very function training uses, at the most common size (32) in RGB
    (some are color); as gray 8x8 when the other side asks for it. The truncated file is skipped in one line."""
    lines: list[str] = []
    loaded = load_folder(PHOTOS, log=lines.append)
    assert loaded.images.shape == (READABLE, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert loaded.details["classes"] == ["scenes", "textures"] and loaded.details["skipped_files"] == [BROKEN]
    assert "2 classes, 1 unreadable file skipped" in loaded.source
    assert lines == [f"skipped 1 unreadable image file in {PHOTOS}: {BROKEN}"]
    copy = readable_copy(tmp_path)
    for size, channels in ((32, 3), (8, 1)):
        trained_on = image_folder(DataConfig(name="image_folder", path=str(copy), image_size=size, channels=channels))
        evaluated = load_folder(PHOTOS, size=size, channels=channels).images  # (9, C, S, S)
        assert torch.equal(evaluated, to_uint8(trained_on.tensors()[0]))
    gray = load_folder(PHOTOS / "textures", log=lines.append).images  # gray, gray + alpha, 16-bit: all gray
    assert gray.shape == (4, 1, 32, 32)
    gravel = gray[3].float()  # 16-bit gray scaled to 8 bits, not clipped at 255 as PIL's own conversion does
    assert 20 < gravel.mean() < 235 and gravel.std() > 5


def test_nothing_readable_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    shutil.copy(PHOTOS / BROKEN, tmp_path / "only" / "a.png")
    with pytest.raises(UsageError) as info:
        load_folder(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "no readable images" in message and "only/a.png" in message


def test_cli_eval_photos_against_themselves(extractor: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The same folder on both sides scores FID 0; a batch larger than the set is fine; the skipped file is
    named on stderr, once per side, and in the JSON report."""
    code, out, err = cli(
        "eval", str(PHOTOS), "--ref", str(PHOTOS), "--extractor", str(extractor), "--batch-size", "64", "--json", "-"
    )
    assert code == 0, err
    report = json.loads(out)
    assert abs(report["metrics"]["fid"]) < 1e-3 and report["metrics"]["kid_subset_size"] == READABLE
    for side in ("samples", "reference"):
        assert report[side]["n"] == READABLE and report[side]["shape"] == [3, 32, 32]
        assert report[side]["skipped"] == 1 and report[side]["skipped_files"] == [BROKEN]
    assert err.strip().splitlines() == [f"skipped 1 unreadable image file in {PHOTOS}: {BROKEN}"] * 2


def test_cli_eval_a_pixel_model_against_the_photos(trained: Path, extractor: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The tiny model makes gray 8x8 images: the photos become gray 8x8, as training on them would make them."""
    args = ["--n", "6", "--steps", "2", "--ref", str(PHOTOS), "--extractor", str(extractor), "--no-progress"]
    code, out, err = cli("eval", str(trained), *args, "--batch-size", "64", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"]["n"] == 6 and report["samples"]["shape"] == [1, 8, 8]
    assert report["reference"]["n"] == READABLE and report["reference"]["shape"] == [1, 8, 8]
    assert np.isfinite(report["metrics"]["fid"])
    code, _, err = cli("eval", str(trained), *args, "--vae", str(PHOTOS))  # a folder without config.json
    assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def latent_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained for 2 steps on random 4x8x8 latents, and the tiny VAE (4 latent channels, one
    halving) that decodes them to RGB 16x16: (run folder, VAE folder)."""
    from fpdm.io.vae_weights import save_vae
    from fpdm.models.vae import AutoencoderKL, VAEConfig
    from fpdm.training.loop import train

    root = tmp_path_factory.mktemp("latent")
    rng = np.random.default_rng(0)
    for folder in ("tiny_features", "tiny_labels"):
        (root / "data" / folder).mkdir(parents=True)
    for i in range(8):  # the official layout: <name>_features/<i>.npy (1, 4, H, W), <name>_labels/<i>.npy (1,)
        np.save(root / "data" / "tiny_features" / f"{i}.npy", rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
        np.save(root / "data" / "tiny_labels" / f"{i}.npy", np.array([i % 2], dtype=np.int64))
    latent = ("data.name=latents", "data.channels=4", "data.image_size=8", "train.steps=2", "train.ckpt_every=2")
    train(tiny_config(root / "data", root / "run", *latent), registry=REGISTRY, progress=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), norm_num_groups=8, latent_channels=4))
    return root / "run", save_vae(vae, root / "vae")


def test_cli_eval_a_latent_model_through_its_vae(
    latent_run: tuple[Path, Path], extractor: Path, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    """`fpdm eval RUN --vae DIR` decodes the samples as `fpdm sample --vae` does (RGB 16x16 here) and converts the
    photos to match; without a VAE, or with one of other latent channels, it refuses before sampling. The VAE a
    run records is used when none is given."""
    import fpdm
    from fpdm.io.vae_weights import save_vae
    from fpdm.models.vae import AutoencoderKL, VAEConfig

    run, vae = latent_run
    args = ["--n", "6", "--steps", "2", "--ref", str(PHOTOS), "--extractor", str(extractor), "--no-progress"]
    code, out, err = cli("eval", str(run), *args, "--vae", str(vae), "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"]["shape"] == [3, 16, 16] and report["samples"]["vae"] == str(vae)
    assert report["reference"]["shape"] == [3, 16, 16] and report["reference"]["n"] == READABLE
    code, _, err = cli("eval", str(run), *args)
    assert code == 2 and "generates latents of shape (4, 8, 8); pass --vae DIR" in err
    other = save_vae(AutoencoderKL(VAEConfig(block_out_channels=(8,), norm_num_groups=8, latent_channels=3)), tmp_path)
    code, _, err = cli("eval", str(run), *args, "--vae", str(other))
    assert code == 2 and "has 3 latent channels; this model generates 4" in err
    pipe = fpdm.load(run, device="cpu")
    pipe.spec["latent"]["vae"] = str(vae)  # as a run that recorded its VAE
    result = fpdm.evaluate(
        pipe, n=6, ref=str(PHOTOS), extractor=str(extractor), sample=fpdm.SampleConfig(steps=2), progress=False
    )
    assert result.fid == report["metrics"]["fid"] and result.samples.details["vae"] == str(vae)
