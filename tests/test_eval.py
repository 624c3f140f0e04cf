"""`fpdm eval` and the torch-fidelity path: known answers on a tiny extractor, the CLI offline, bad input.

The tiny extractor here is an untrained, seeded CNN with 8 features (small sample counts then suffice); the real
one is shipped with fpdm and checked by its sha256. Only one test trains (a few steps, to cover the code that
made the shipped file). Everything runs offline: no Inception weights, no downloads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from fpdm.errors import UsageError
from fpdm.eval import features
from fpdm.eval.features import (
    SHIPPED_SHA256,
    FmnistCNN,
    load_extractor,
    save_extractor,
    to_model_input,
    train_extractor,
)
from fpdm.eval.fidelity import check_pair, cnn_extractor, compute_metrics
from support import run_cli

FEATURES = 8  # FID needs more samples than feature dimensions: a small dim keeps the fixtures small


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory: pytest.TempPathFactory, fmnist: torch.Tensor) -> Path:
    """A seeded, untrained tiny CNN: its features still tell images apart, and nothing trains. Its features are
    scaled to unit RMS on Fashion-MNIST, as `train_extractor` scales the real one's."""
    path = tmp_path_factory.mktemp("extractor") / "tiny.safetensors"
    torch.manual_seed(0)
    model = FmnistCNN(widths=(4, 8, 8), features=FEATURES).eval()
    with torch.no_grad():
        rms = model.embed(to_model_input(fmnist)).pow(2).mean().sqrt()
        model.feature_scale.fill_(1.0 / float(rms))
    save_extractor(model, path, test_accuracy=0.1, test_images=0, train_steps=0)
    return path


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    """The first 200 Fashion-MNIST test images as uint8 (200, 1, 32, 32)."""
    from fpdm.eval.inputs import load_reference

    return load_reference("fashion_mnist", split="test", data_dir=None, limit=None, seed=0).images[:200]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`fpdm ARGS` in this process: (exit code, stdout, stderr)."""
    from fpdm.apps.cli import main

    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):  # (C, H, W) uint8
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{k:06d}.png")
    return folder


@pytest.mark.slow
def test_train_extractor_records_accuracy_and_hash(tmp_path: Path) -> None:
    """The code that made the shipped file, on a few steps of a subset."""
    path = tmp_path / "trained.safetensors"
    report = train_extractor(
        path, steps=10, batch_size=64, train_limit=640, test_limit=200, widths=(4, 8, 8), features=FEATURES
    )
    loaded = load_extractor(path)
    assert 0.0 <= loaded.test_accuracy <= 1.0 and loaded.test_images == 200 and loaded.train_steps == 10
    assert loaded.sha256 == report.sha256 and loaded.sha256[:12] in loaded.describe()
    assert loaded.model.features == FEATURES


def test_saving_the_same_weights_gives_the_same_bytes(extractor_file: Path, tmp_path: Path) -> None:
    """safetensors orders its metadata map differently on each save; fpdm sorts it, so a file's sha256 depends
    on the weights and metadata alone."""
    model = load_extractor(extractor_file).model
    hashes = {
        save_extractor(model, tmp_path / f"{k}.safetensors", test_accuracy=0.1, test_images=0, train_steps=0)
        for k in range(4)
    }
    assert hashes == {load_extractor(extractor_file).sha256}


def test_shipped_extractor_is_the_pinned_file() -> None:
    """Its sha256 is the constant, and its metadata the accuracy docs/evaluation.md states."""
    path = features.shipped_path()
    assert path.is_file() and path.parent.name == "weights"
    loaded = features.load_shipped()
    assert loaded.sha256 == SHIPPED_SHA256 and loaded.path == path
    assert loaded.test_accuracy == pytest.approx(0.9105) and loaded.test_images == 10000
    assert loaded.train_steps == 1404 and loaded.model.features == 128
    assert SHIPPED_SHA256[:12] in Path(__file__).parents[1].joinpath("docs", "evaluation.md").read_text()


def test_a_corrupted_shipped_extractor_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "weights" / features.FILE_NAME
    copy.parent.mkdir()
    data = bytearray(features.shipped_path().read_bytes())
    data[-1] ^= 0xFF  # one weight's last byte: still a valid safetensors file, other weights
    copy.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=re.escape(str(copy)) + f".*not the expected {SHIPPED_SHA256[:12]}"):
        load_extractor(copy, sha256=SHIPPED_SHA256)
    monkeypatch.setattr(features, "shipped_path", lambda: copy)
    samples = write_pngs(tmp_path / "s", torch.zeros(3, 1, 32, 32, dtype=torch.uint8))
    code, _, err = cli("eval", str(samples), "--extractor", "fpdm-fmnist-cnn", "--ref-n", "200")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(copy) in lines[0] and "sha256" in lines[0]


@pytest.mark.slow
def test_default_extractor_is_the_shipped_one_without_a_cache(
    fmnist: torch.Tensor, extractor_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto / fpdm-fmnist-cnn read the shipped file: ~/.cache is neither read nor written, nothing trains;
    `cache` selects a retrained one."""
    import fpdm.eval.evaluation as evaluation

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained an extractor")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(evaluation, "train_extractor", never)
    samples = fmnist.float() / 127.5 - 1  # (200, 1, 32, 32) in [-1, 1]: more than the 128 features need
    for choice in ("auto", "fpdm-fmnist-cnn"):
        result = evaluation.evaluate(samples, ref_n=300, extractor=choice, prc=False, progress=False)
        assert result.extractor.sha256 == SHIPPED_SHA256 and result.extractor.weights == str(features.shipped_path())
        assert result.extractor.test_accuracy == pytest.approx(0.9105) and result.extractor.features == 128
    assert not (tmp_path / "home").exists()
    cache = tmp_path / "retrained"
    cache.mkdir()
    (cache / features.FILE_NAME).write_bytes(extractor_file.read_bytes())
    result = evaluation.evaluate(samples[:40], ref_n=60, cache=str(cache), prc=False, progress=False)
    assert result.extractor.sha256 == load_extractor(extractor_file).sha256


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


@pytest.mark.slow
def test_cli_eval_folders_offline(extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path) -> None:
    samples = write_pngs(tmp_path / "samples" / "images", fmnist[:40])  # an `fpdm sample` folder's layout
    (tmp_path / "samples" / "stats.json").write_text("{}")
    Image.new("RGB", (70, 70)).save(tmp_path / "samples" / "grid.png")  # beside images/: no sample
    ref = write_pngs(tmp_path / "ref", fmnist[40:100])
    out = tmp_path / "report.json"
    r = run_cli(
        "eval",
        str(samples.parent),
        "--ref",
        str(ref),
        "--extractor",
        str(extractor_file),
        "--json",
        str(out),
        env={"TORCH_HOME": str(tmp_path / "torch-home")},
    )
    assert r.returncode == 0, r.stderr
    assert "FID (fpdm-fmnist-cnn features)" in r.stdout and "Inception" not in r.stdout
    report = json.loads(out.read_text())
    assert report["samples"]["n"] == 40 and report["reference"]["n"] == 60
    assert report["extractor"]["sha256"] == load_extractor(extractor_file).sha256
    assert report["metrics"]["kid_subset_size"] == 40 and 0.0 <= report["metrics"]["precision"] <= 1.0


@pytest.mark.slow
def test_cli_eval_samples_a_checkpoint_first(trained: Path, extractor_file: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """A run folder is sampled first (the tiny model makes 8x8 images, so the reference is 8x8 too), and
    `fpdm.evaluate` on the loaded pipeline gives the same numbers."""
    import fpdm

    ref = write_pngs(tmp_path / "ref8", (torch.rand(30, 1, 8, 8) * 255).to(torch.uint8))
    code, out, err = cli(
        "eval",
        str(trained),
        "--n",
        "12",
        "--steps",
        "2",
        "--ref",
        str(ref),
        "--no-prc",
        "--extractor",
        str(extractor_file),
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    assert "12 images gray 8x8" in out and "30 images" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"]["step"] == 6 and report["samples"]["steps"] == 2
    assert report["samples"]["blocks_per_sample"] > 0 and report["samples"]["weights"] == "ema"
    pipe = fpdm.load(trained, device="cpu")
    result = fpdm.evaluate(
        pipe,
        n=12,
        ref=str(ref),
        prc=False,
        extractor=str(extractor_file),
        sample=fpdm.SampleConfig(steps=2),
        progress=False,
    )
    assert (result.fid, result.kid_mean) == (report["metrics"]["fid"], report["metrics"]["kid_mean"])


@pytest.mark.slow
def test_cli_eval_fashion_mnist_reference_names_split(
    extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    samples = write_pngs(tmp_path / "s", fmnist[:30])
    code, out, err = cli(
        "eval", str(samples), "--ref", "fashion_mnist", "--ref-n", "300", "--extractor", str(extractor_file)
    )
    assert code == 0, err
    assert "Fashion-MNIST test split" in out and "300 images" in out and "30 images" in out


def _bad_inputs(root: Path, fmnist: torch.Tensor) -> dict[str, tuple[list[str], str]]:
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    for k in range(3):
        (root / "broken" / f"{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(k))  # a signature, then nothing
    few = write_pngs(root / "few", fmnist[:5])
    gray = write_pngs(root / "gray", fmnist[:30])
    return {
        "empty": ([str(root / "empty"), "--ref", str(gray)], "no images"),
        "broken": ([str(root / "broken"), "--ref", str(gray)], "no readable images"),
        "unreadable": ([str(gray), "--ref", str(root / "broken")], "all 3 image files failed"),
        "few": ([str(few), "--ref", str(gray)], "needs at least"),
        "inception": ([str(gray), "--ref", str(gray), "--extractor", "inception-v3"], "never downloads"),
    }


@pytest.mark.parametrize("case", ["empty", "broken"])
def test_folder_refusals(case: str, fmnist: torch.Tensor, tmp_path: Path) -> None:
    from fpdm.eval.inputs import load_folder

    args, message = _bad_inputs(tmp_path, fmnist)[case]
    with pytest.raises(UsageError, match=message):
        load_folder(args[0])


def test_folders_convert_as_training_does(fmnist: torch.Tensor, tmp_path: Path) -> None:
    """Mixed sizes are resized to the most common size and gray stored as RGB is gray, each image through
    training's own `load_image`; what the folder's own layout leaves open follows the other side."""
    from fpdm.data.images import load_image
    from fpdm.eval.inputs import load_folder

    mixed = write_pngs(tmp_path / "mixed", fmnist[:20])
    Image.fromarray(fmnist[0, 0, 2:30, 2:30].numpy()).save(mixed / "odd.png")  # 28x28 among 32x32
    loaded = load_folder(mixed)
    assert loaded.images.shape == (21, 1, 32, 32) and torch.equal(loaded.images[:20], fmnist[:20])
    assert torch.equal(loaded.images[20], load_image(mixed / "odd.png", 32, 1))
    rgb = write_pngs(tmp_path / "rgb", fmnist[:20].expand(-1, 3, -1, -1).contiguous())
    assert torch.equal(load_folder(rgb).images, fmnist[:20])  # gray stored as RGB: gray
    color = load_folder(rgb, size=16, channels=3)  # as the other side asks: RGB 16x16
    assert color.images.shape == (20, 3, 16, 16)
    assert torch.equal(color.images[3], load_image(rgb / "000003.png", 16, 3))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unreadable", "few", "inception"])
def test_cli_eval_bad_input_is_one_line(
    case: str, extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:  # type: ignore[no-untyped-def]
    args, message = _bad_inputs(tmp_path, fmnist)[case]
    extra = [] if case == "inception" else ["--extractor", str(extractor_file)]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code, _, err = cli("eval", *args, *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


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


# --------------------------------------------------------------------------------------------------------------
# fpdm.evaluate: the library call behind `fpdm eval`


def test_evaluate_matches_the_cli_on_a_folder_and_on_a_tensor(
    extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    import fpdm

    samples = write_pngs(tmp_path / "samples", fmnist[:40])
    ref = write_pngs(tmp_path / "ref", fmnist[40:100])
    code, out, err = cli(
        "eval",
        str(samples),
        "--ref",
        str(ref),
        "--extractor",
        str(extractor_file),
        "--json",
        str(tmp_path / "report.json"),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    from_folder = fpdm.evaluate(samples, ref=str(ref), extractor=str(extractor_file), progress=False)
    as_floats = fmnist[:40].float() / 127.5 - 1  # what Pipeline.sample returns: float32 in [-1, 1]
    from_tensor = fpdm.evaluate(as_floats, ref=str(ref), extractor=str(extractor_file), progress=False)
    for result in (from_folder, from_tensor):
        assert (result.fid, result.kid_mean, result.kid_std) == (
            report["metrics"]["fid"],
            report["metrics"]["kid_mean"],
            report["metrics"]["kid_std"],
        )
        assert (result.precision, result.recall) == (report["metrics"]["precision"], report["metrics"]["recall"])
        assert result.n == 40 and result.reference.n == 60
        assert result.extractor.name == "fpdm-fmnist-cnn"
        assert result.extractor.sha256 == load_extractor(extractor_file).sha256
    assert from_folder.to_dict()["metrics"] == report["metrics"]
    assert from_folder.lines() == report["lines"] and out.strip().splitlines() == report["lines"]


def test_evaluate_options_come_from_a_config_and_keywords(
    extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path
) -> None:
    import inspect

    import attrs

    from fpdm.config import EvalConfig
    from fpdm.eval.evaluation import _options, evaluate

    signature = inspect.signature(evaluate).parameters
    for field in attrs.fields(EvalConfig):  # one default per option, in the signature and in the config
        assert signature[field.name].default == field.default, field.name
    config = EvalConfig(ref_n=30, prc=False, seed=3)
    assert _options(config, kid_subset_size=7) == attrs.evolve(config, kid_subset_size=7)
    assert _options(None, ref_n=5) == EvalConfig(ref_n=5)
    with pytest.raises(UsageError, match="ref_n"):
        _options(None, ref_n=0)
    ref = write_pngs(tmp_path / "ref", fmnist[40:100])
    result = evaluate(fmnist[:40], config=config, ref=str(ref), extractor=str(extractor_file), progress=False)
    assert result.precision is None and result.reference.n == 30 and "seeded random 30 of 60" in result.reference.source
    assert "precision" not in result.to_dict()["metrics"]


def test_evaluate_refuses_cheaply(
    trained: Path, extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:  # type: ignore[no-untyped-def]
    """Counts, paths and the extractor choice are checked before a model is loaded or an extractor trained."""
    import fpdm.eval.evaluation as evaluation

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded or trained before the cheap checks")

    monkeypatch.setattr(evaluation, "train_extractor", never)
    monkeypatch.setattr(evaluation, "_load_pipeline", never)
    with pytest.raises(UsageError, match="give n .*1000"):
        evaluation.evaluate(trained, ref=str(tmp_path), progress=False)
    ref = write_pngs(tmp_path / "ref", fmnist[:20])
    with pytest.raises(UsageError, match="never downloads"):
        evaluation.evaluate(
            trained, n=10, ref=str(ref), extractor="inception-v3", inception_weights=None, progress=False
        )
    with pytest.raises(UsageError, match="expected auto"):
        evaluation.evaluate(trained, n=10, ref=str(ref), extractor=str(tmp_path / "nope.safetensors"), progress=False)
    with pytest.raises(UsageError, match="does not exist"):
        evaluation.evaluate(tmp_path / "missing", ref=str(ref), progress=False)
    with pytest.raises(UsageError, match="1 or 3 channels"):
        evaluation.evaluate(torch.zeros(4, 2, 8, 8), ref=str(ref), progress=False)
    monkeypatch.setattr(evaluation, "load_reference", never)
    monkeypatch.setattr(evaluation, "load_folder", never)
    with pytest.raises(
        UsageError, match=r"ref_n \(--ref-n\) is 5; .*fpdm-fmnist-cnn features \(128-d\) needs at least 129"
    ):
        evaluation.evaluate(ref, ref_n=5, progress=False)
    with pytest.raises(UsageError, match=f"n \\(--n\\) is 8; .*needs at least {FEATURES + 1}"):
        evaluation.evaluate(trained, n=8, ref=str(ref), extractor=str(extractor_file), progress=False)
    code, _, err = cli("eval", str(trained), "--ref", str(ref))
    assert code == 2 and "give n (--n)" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("eval", str(trained), "--n", "0")
    assert code == 2 and "--n must be >= 1" in err


def test_cli_checks_before_training_the_extractor(
    trained: Path, fmnist: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:  # type: ignore[no-untyped-def]
    """`--train-extractor` trains for minutes: every check that can fail runs before it."""
    import fpdm.eval.evaluation as evaluation

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the cheap checks")

    monkeypatch.setattr(evaluation, "train_fmnist_extractor", never)
    samples = write_pngs(tmp_path / "s", fmnist[:20])
    cases = [
        (["--ref-n", "5"], "ref_n (--ref-n) is 5"),
        ([str(samples), "--ref-n", "100"], "needs at least 129"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(trained)], "give n (--n)"),
        ([str(samples), "--ref", str(tmp_path / "no-ref")], "not a folder and not a known dataset"),
        ([str(samples), "--vae", str(tmp_path)], "decodes a latent model's samples"),
        ([str(samples), "--extractor", "inception-v3"], "drop --extractor inception-v3"),
    ]
    for args, message in cases:
        code, _, err = cli("eval", "--train-extractor", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)


def test_cli_knows_the_named_extractors_feature_sizes() -> None:
    """`fpdm eval` refuses impossible counts before importing torch, from its own copy of the feature sizes."""
    from fpdm.apps import eval_cmd
    from fpdm.eval.fidelity import CNN_NAME, INCEPTION, INCEPTION_FEATURES

    expected = {CNN_NAME: features.load_shipped().model.features, INCEPTION: INCEPTION_FEATURES}
    assert expected == eval_cmd.NAMED_FEATURES
    assert eval_cmd.CNN_NAME == CNN_NAME


def test_cli_refuses_a_tiny_ref_n_without_importing_torch(tmp_path: Path) -> None:
    """The refusal the issue timed at ~100 s (the extractor trained first): now from the flags alone."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from fpdm.apps.cli import main; "
        "code = main(['eval', sys.argv[1], '--ref-n', '5']); print(code, 'torch' in sys.modules)"
    )
    env = {**os.environ, "FPDM_LOAD_PLUGINS": ""}
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ref_n (--ref-n) is 5" in lines[0] and "needs at least 129" in lines[0]


def test_cli_eval_json_to_stdout_and_weights_aliases(
    extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    samples = write_pngs(tmp_path / "s", fmnist[:30])
    ref = write_pngs(tmp_path / "r", fmnist[30:70])
    common = ["--ref", str(ref), "--extractor", str(extractor_file), "--no-prc"]
    code, out, err = cli("eval", str(samples), *common, "--json", "-")
    assert code == 0, err
    report = json.loads(out)  # stdout holds only the JSON
    assert report["samples"]["n"] == 30 and report["metrics"]["kid_subset_size"] == 30
    code, out, err = cli("eval", str(samples), "--json", *common)  # the old bare flag: stdout too
    assert code == 0, err
    assert json.loads(out)["metrics"] == report["metrics"]
    code, out, err = cli("eval", str(samples), *common, "--no-ema")
    assert code == 0 and err.strip().splitlines() == ["fpdm: --no-ema is deprecated; use --weights raw"]


def test_cli_train_extractor_then_evaluates_with_the_retrained_one(
    extractor_file: Path, fmnist: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:  # type: ignore[no-untyped-def]
    """`--train-extractor INPUT` scores INPUT on the fresh file in --cache, not the shipped one (training itself
    is replaced by a copy of the tiny extractor: the real run takes minutes)."""
    import fpdm.eval.evaluation as evaluation

    def fake_train(cache: str | None = None, *, log: object = None) -> object:
        path = features.cache_path(cache)
        path.write_bytes(extractor_file.read_bytes())
        return cnn_extractor(path)

    monkeypatch.setattr(evaluation, "train_fmnist_extractor", fake_train)
    samples = write_pngs(tmp_path / "s", fmnist[:30])
    ref = write_pngs(tmp_path / "r", fmnist[30:70])
    args = ["--ref", str(ref), "--train-extractor", "--cache", str(tmp_path), "--no-prc", "--json", "-"]
    code, out, err = cli("eval", str(samples), *args)
    assert code == 0, err
    assert json.loads(out)["extractor"]["sha256"] == load_extractor(extractor_file).sha256 != SHIPPED_SHA256
