"""`fpdm eval` and the torch-fidelity path: known answers on a tiny extractor, the CLI offline, bad input.

The extractor here is trained for a few dozen steps on a small subset (seconds); the real >= 90% one is what
`fpdm eval --train-extractor` builds. Everything runs offline: no Inception weights, no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fpdm.errors import UsageError
from fpdm.eval.features import load_extractor, train_extractor
from fpdm.eval.fidelity import check_pair, cnn_extractor, compute_metrics

from conftest import run_cli

FEATURES = 8  # FID needs more samples than feature dimensions: a small dim keeps the fixtures small


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("extractor") / "tiny.safetensors"
    train_extractor(path, steps=40, batch_size=64, train_limit=2560, test_limit=500, widths=(4, 8, 8),
                    features=FEATURES)
    return path


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    """The first 200 Fashion-MNIST test images as uint8 (200, 1, 32, 32)."""
    from fpdm.apps.eval_inputs import load_reference

    return load_reference("fashion_mnist", split="test", data_dir=None, limit=None, seed=0).images[:200]


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):  # (C, H, W) uint8
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{k:06d}.png")
    return folder


def test_extractor_file_records_accuracy_and_hash(extractor_file: Path) -> None:
    loaded = load_extractor(extractor_file)
    assert 0.0 <= loaded.test_accuracy <= 1.0 and loaded.test_images == 500 and loaded.train_steps == 40
    assert len(loaded.sha256) == 64 and loaded.sha256[:12] in loaded.describe()
    assert loaded.model.features == FEATURES


def test_fid_of_a_set_against_itself_is_zero_and_shift_raises_it(extractor_file: Path, fmnist: torch.Tensor) -> None:
    extractor = cnn_extractor(extractor_file)
    same = compute_metrics(fmnist, fmnist, extractor=extractor, prc=False)
    brighter = (fmnist.int() + 60).clamp(0, 255).to(torch.uint8)
    shifted = compute_metrics(brighter, fmnist, extractor=extractor, prc=False)
    assert abs(same["fid"]) < 1e-4
    assert shifted["fid"] > 0.1 and shifted["fid"] > 1000 * abs(same["fid"])
    assert shifted["kid_mean"] > same["kid_mean"]
    assert same["kid_subset_size"] == 200  # capped at the set size


def test_check_pair_refuses_what_cannot_be_compared(extractor_file: Path, fmnist: torch.Tensor) -> None:
    extractor = cnn_extractor(extractor_file)
    with pytest.raises(UsageError, match="grayscale but reference is RGB"):
        check_pair(fmnist, fmnist.expand(-1, 3, -1, -1), extractor=extractor)
    with pytest.raises(UsageError, match="32x32 but reference is 28x28"):
        check_pair(fmnist, fmnist[:, :, 2:30, 2:30], extractor=extractor)
    with pytest.raises(UsageError, match=f"needs at least {FEATURES + 1}"):
        check_pair(fmnist[:FEATURES], fmnist, extractor=extractor)


def test_cli_eval_folders_offline(extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path) -> None:
    samples = write_pngs(tmp_path / "samples" / "images", fmnist[:40])  # an `fpdm sample` folder's layout
    (tmp_path / "samples" / "stats.json").write_text("{}")
    Image.new("RGB", (70, 70)).save(tmp_path / "samples" / "grid.png")  # beside images/: no sample
    ref = write_pngs(tmp_path / "ref", fmnist[40:100])
    out = tmp_path / "report.json"
    r = run_cli("eval", str(samples.parent), "--ref", str(ref), "--extractor", str(extractor_file),
                "--json", str(out), env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert r.returncode == 0, r.stderr
    assert "FID (fpdm-fmnist-cnn features)" in r.stdout and "Inception" not in r.stdout
    report = json.loads(out.read_text())
    assert report["samples"]["n"] == 40 and report["reference"]["n"] == 60
    assert report["extractor"]["sha256"] == load_extractor(extractor_file).sha256
    assert report["metrics"]["kid_subset_size"] == 40 and 0.0 <= report["metrics"]["precision"] <= 1.0


def test_cli_eval_samples_a_checkpoint_first(trained: Path, extractor_file: Path, tmp_path: Path) -> None:
    """A run folder is sampled first (the tiny model makes 8x8 images, so the reference is 8x8 too)."""
    ref = write_pngs(tmp_path / "ref8", (torch.rand(30, 1, 8, 8) * 255).to(torch.uint8))
    r = run_cli("eval", str(trained), "--n", "12", "--steps", "2", "--ref", str(ref), "--no-prc",
                "--extractor", str(extractor_file))
    assert r.returncode == 0, r.stderr
    assert "12 images gray 8x8" in r.stdout and "30 images" in r.stdout


def test_cli_eval_fashion_mnist_reference_names_split(extractor_file: Path, fmnist: torch.Tensor,
                                                      tmp_path: Path) -> None:
    samples = write_pngs(tmp_path / "s", fmnist[:30])
    r = run_cli("eval", str(samples), "--ref", "fashion_mnist", "--ref-n", "300", "--extractor", str(extractor_file))
    assert r.returncode == 0, r.stderr
    assert "Fashion-MNIST test split" in r.stdout and "300 images" in r.stdout and "30 images" in r.stdout


def _bad_inputs(root: Path, fmnist: torch.Tensor) -> dict[str, tuple[list[str], str]]:
    (root / "empty").mkdir()
    mixed = write_pngs(root / "mixed", fmnist[:20])
    Image.fromarray(fmnist[0, 0, 2:30, 2:30].numpy()).save(mixed / "odd.png")
    rgb = write_pngs(root / "rgb", fmnist[:20].expand(-1, 3, -1, -1).contiguous())
    few = write_pngs(root / "few", fmnist[:5])
    gray = write_pngs(root / "gray", fmnist[:30])
    return {
        "empty": ([str(root / "empty"), "--ref", str(gray)], "no images"),
        "mixed": ([str(mixed), "--ref", str(gray)], "mixes image sizes"),
        "rgb": ([str(rgb), "--ref", str(gray)], "RGB but reference is grayscale"),
        "few": ([str(few), "--ref", str(gray)], "needs at least"),
        "inception": ([str(gray), "--ref", str(gray), "--extractor", "inception-v3"], "never downloads"),
    }


@pytest.mark.parametrize("case", ["empty", "mixed"])
def test_folder_refusals(case: str, fmnist: torch.Tensor, tmp_path: Path) -> None:
    from fpdm.apps.eval_inputs import load_folder

    args, message = _bad_inputs(tmp_path, fmnist)[case]
    with pytest.raises(UsageError, match=message):
        load_folder(args[0])


@pytest.mark.parametrize("case", ["rgb", "few", "inception"])
def test_cli_eval_bad_input_is_one_line(case: str, extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path) -> None:
    args, message = _bad_inputs(tmp_path, fmnist)[case]
    extra = [] if case == "inception" else ["--extractor", str(extractor_file)]
    r = run_cli("eval", *args, *extra, env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_inception_weights_are_found_locally_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch-fidelity's own file in the torch hub cache is used; nothing is ever downloaded."""
    from fpdm.eval.fidelity import inception_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert inception_weights(None) is None
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert inception_weights(None) == cached
    with pytest.raises(UsageError, match="does not exist"):
        inception_weights(str(tmp_path / "missing.pth"))
