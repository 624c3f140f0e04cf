"""The Python API (`fpdm.load` -> `Pipeline`), the packed model folder, and `fpdm sample` / `fpdm pack` /
`fpdm export` as thin layers over it: same images bit for bit, same errors."""

from __future__ import annotations

import inspect
import json
import math
import shutil
import subprocess

import attrs
import numpy as np
import pytest
import tomllib
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import fpdm
import fpdm.config
from fpdm.config import ExportConfig, SampleConfig, load_config
from fpdm.data.images import to_uint8
from fpdm.errors import UsageError
from fpdm.io.checkpoint import list_checkpoints, load_checkpoint
from fpdm.io.packed import dumps_toml
from fpdm.pipeline import Pipeline
from support import REGISTRY, one_line_error, tiny_config

FAST = {"steps": 3, "iters": 2}  # a few cheap steps: these tests are about plumbing, not image quality


@pytest.fixture(scope="module")
def pipe(trained):
    return fpdm.load(trained, registry=REGISTRY)


@pytest.fixture
def cli(capsys, monkeypatch):  # type: ignore[no-untyped-def]
    """`fpdm ARGS` in this process: a CompletedProcess-like result."""
    from fpdm.apps.cli import main

    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


def _one_line(info: pytest.ExceptionInfo) -> str:
    text = str(info.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------- the three lines


def test_three_lines_from_a_run_and_from_its_packed_folder(trained, tmp_path):
    pipe = fpdm.load(trained)
    out = pipe.sample(n=2, classes=["dark"], seed=0, output_type="pil", **FAST)
    assert len(out.images) == 2 and out.images[0].size == (8, 8) and out.images[0].mode == "L"
    assert out.labels.tolist() == [1, 1] and out.blocks.tolist() == [3 * (2 + 2)] * 2  # (pre + post + iters) x steps
    packed = pipe.save_pretrained(tmp_path / "packed")
    assert sorted(p.name for p in packed.iterdir()) == ["README.md", "config.toml", "model.safetensors"]
    again = fpdm.load(packed)
    assert again.kind == "packed" and again.step == pipe.step and again.class_names == ["bright", "dark"]
    assert again.config == pipe.config and again.spec == pipe.spec
    want = pipe.sample(n=2, classes=["dark"], seed=0, **FAST).images
    assert torch.equal(again.sample(n=2, classes=["dark"], seed=0, **FAST).images, want)  # fp32: same weights


def test_sample_is_bit_identical_to_fpdm_sample(pipe, trained, tmp_path, cli):
    out = tmp_path / "s"
    done = cli(
        "sample",
        trained,
        "--n",
        "5",
        "--batch-size",
        "2",
        "--steps",
        "3",
        "--iters",
        "2",
        "--class",
        "dark",
        "--class",
        "0",
        "--seed",
        "3",
        "--out",
        out,
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    api = pipe.sample(n=5, batch_size=4, steps=3, iters=2, classes=["dark", 0], seed=3, output_type="pil")
    for k, image in enumerate(api.images):  # another batch size: image k depends on (seed, k) only
        with Image.open(out / "images" / f"{k:06d}.png") as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["blocks_per_sample"]["max"] == int(api.blocks.max()) and stats["weights"] == "ema"
    assert stats["iterations_plan"] == api.plan["iterations"] == [2, 2, 2]


def test_sample_config_and_keywords(pipe):
    config = SampleConfig(n=2, classes=(1,), seed=5, **FAST)
    a = pipe.sample(config)
    assert torch.equal(a.images, pipe.sample(n=2, classes=[1], seed=5, **FAST).images)
    b = pipe.sample(config, seed=6)  # a keyword that differs from its default overrides the config
    assert b.labels.tolist() == [1, 1] and not torch.equal(a.images, b.images)
    params = inspect.signature(Pipeline.sample).parameters
    for field in attrs.fields(SampleConfig):  # defaults visible in the signature are SampleConfig's
        assert params[field.name].default == field.default, field.name
        assert params[field.name].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match="nonsense"):
        pipe.sample(n=1, nonsense=3)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="n must be >= 1"):
        pipe.sample(n=0)


def test_classes_by_name_and_id(pipe):
    by_name = pipe.sample(n=3, classes=["dark", "bright"], **FAST)
    assert by_name.labels.tolist() == [1, 0, 1]
    assert pipe.sample(n=2, classes="DARK", **FAST).labels.tolist() == [1, 1]  # one name, case-folded
    assert torch.equal(pipe.sample(n=3, classes=[1, 0], **FAST).images, by_name.images)
    assert pipe.sample(n=3, **FAST).labels.tolist() == [0, 1, 0]  # default: every class in turn
    with pytest.raises(UsageError) as info:
        pipe.sample(n=1, classes=["Sneaker"])
    assert "invalid class 'Sneaker'" in _one_line(info) and "bright, dark" in str(info.value)
    with pytest.raises(UsageError, match=r"class id 2 out of range: the model has classes 0..1 \(bright, dark\)"):
        pipe.sample(n=1, classes=[2])


def test_output_types(pipe):
    tensor = pipe.sample(n=2, seed=1, **FAST).images
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.shape == (2, 1, 8, 8)
    assert tensor.min() >= -1 and tensor.max() <= 1
    array = pipe.sample(n=2, seed=1, output_type="numpy", **FAST).images
    assert array.dtype == np.uint8 and array.shape == (2, 8, 8, 1)
    assert np.array_equal(array, to_uint8(tensor).permute(0, 2, 3, 1).numpy())
    pils = pipe.sample(n=2, seed=1, output_type="pil", **FAST).images
    assert np.array_equal(np.asarray(pils[1]), array[1, :, :, 0])
    with pytest.raises(UsageError, match="applies to latent models"):
        pipe.sample(n=1, output_type="latent")
    with pytest.raises(UsageError, match="output_type"):
        pipe.sample(n=1, output_type="jpeg")


def test_seed_generator_and_latents(pipe):
    seeded = pipe.sample(n=3, seed=7, batch_size=2, **FAST)
    gens = [torch.Generator().manual_seed(7 * 1_000_003 + k) for k in range(3)]
    assert torch.equal(pipe.sample(n=3, generator=gens, **FAST).images, seeded.images)
    x_T = torch.stack(
        [torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(7 * 1_000_003 + k)) for k in range(3)]
    )  # each image's first draw is its x_T
    assert torch.equal(pipe.sample(n=3, seed=7, latents=x_T, **FAST).images, seeded.images)
    assert not torch.equal(pipe.sample(n=3, seed=7, latents=x_T.flip(0), **FAST).images, seeded.images)
    one = pipe.sample(n=3, generator=torch.Generator().manual_seed(1), **FAST).images
    # The same noise in batches of one: equal up to the float rounding a matmul's batch size may change.
    single = pipe.sample(n=3, generator=torch.Generator().manual_seed(1), batch_size=1, **FAST).images
    torch.testing.assert_close(single, one, rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match=r"latents must be a tensor of shape \(n, C, H, W\) = \(3, 1, 8, 8\)"):
        pipe.sample(n=3, latents=torch.zeros(2, 1, 8, 8))
    with pytest.raises(UsageError, match="list of n=3"):
        pipe.sample(n=3, generator=gens[:2])


def test_instances_callback_and_plan(pipe):
    ddim = REGISTRY.create("sampler", "ddim", eta=0.0)
    by_name = pipe.sample(n=2, sampler="ddim", **FAST)
    assert torch.equal(pipe.sample(n=2, sampler=ddim, **FAST).images, by_name.images)
    solver = REGISTRY.create("solver", "anderson")
    seen = []
    out = pipe.sample(n=2, solver=solver, budget=12, steps=3, allocator="increasing", callback=seen.append)
    assert len(seen) == 3 and [s.iterations for s in seen] == out.plan["iterations"]
    assert sum(out.plan["iterations"]) <= 6  # the budget less 3 steps x (pre + post)
    assert out.plan["solver"] == type(solver).__name__ and out.plan["allocator"] == "increasing"
    assert int(out.blocks.max()) <= 12 and len(out.stats) == 3 and out.seconds > 0
    with pytest.raises(UsageError, match="eta applies to a sampler given by name"):
        pipe.sample(n=1, sampler=ddim, eta=0.5)
    with pytest.raises(UsageError, match="unknown sampler 'nope'"):
        pipe.sample(n=1, sampler="nope")


def test_compute_dtype(trained):
    half = fpdm.load(trained, dtype="bf16", registry=REGISTRY)
    assert half.dtype == torch.bfloat16
    images = half.sample(n=2, seed=0, **FAST).images
    full = fpdm.load(trained, registry=REGISTRY).sample(n=2, seed=0, **FAST).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - full).abs().max() < 0.25  # the same samples up to bf16 rounding
    assert half.to(dtype=torch.float32) is half and half.dtype == torch.float32


# ------------------------------------------------------------------------------------------- what load accepts


def test_paths_that_are_no_model_folder_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello")
    for path, needle in (
        (tmp_path / "nowhere", "model not found"),
        (empty, "is not a model folder"),
        (a_file, "is not a model folder"),
        (tmp_path / "m.onnx", "exported ONNX graph"),
    ):
        with pytest.raises(UsageError) as info:
            fpdm.load(path)
        text = _one_line(info)
        assert needle in text and "checkpoints/step-*/meta.json" in text and "config.toml + model.safetensors" in text
    with pytest.raises(UsageError, match="weights must be 'ema' or 'raw'"):
        fpdm.load(empty, weights="best")


def test_a_run_without_optimizer_state_loads_and_samples(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "trainer.pt").unlink()
    pipe = fpdm.load(run, registry=REGISTRY)
    assert pipe.sample(n=1, **FAST).images.shape == (1, 1, 8, 8)
    with pytest.raises(UsageError, match="cannot resume training"):
        load_checkpoint(run).training_state()
    shutil.copy(list_checkpoints(trained / "checkpoints")[-1] / "trainer.pt", ckpt / "trainer.pt")
    (ckpt / "trainer.pt").write_bytes(b"tampered")  # present again: still verified
    with pytest.raises(UsageError, match="checksum mismatch.*trainer.pt"):
        fpdm.load(run, registry=REGISTRY)


def test_packed_folder_hashes_are_verified(pipe, tmp_path):
    packed = pipe.save_pretrained(tmp_path / "p")
    config = tomllib.loads((packed / "config.toml").read_text())
    assert config["fpdm"]["format"] == "fpdm-packed" and set(config["files"]) == {"model.safetensors", "README.md"}
    assert config["fpdm"]["fpdm_version"] == fpdm.__version__ and config["spec"]["class_names"] == ["bright", "dark"]
    for name in ("model.safetensors", "README.md"):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(packed, broken)
        data = bytearray((broken / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (broken / name).write_bytes(bytes(data))
        with pytest.raises(UsageError) as info:
            fpdm.load(broken)
        assert _one_line(info) == f"packed file corrupt (checksum mismatch): {broken / name}"
        (broken / name).unlink()
        with pytest.raises(UsageError, match=f"packed file missing: .*{name}"):
            fpdm.load(broken)
    (packed / "config.toml").write_text("[fpdm\n")
    with pytest.raises(UsageError, match="bad TOML in .*config.toml"):
        fpdm.load(packed)


def test_save_pretrained_refuses_foreign_folders_and_replaces_packed_ones(pipe, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not a packed fpdm model folder"):
        pipe.save_pretrained(taken)
    assert (taken / "mine.txt").read_text() == "keep me"
    out = pipe.save_pretrained(tmp_path / "p", dtype="fp16")
    pipe.save_pretrained(out)  # a packed folder is replaced, atomically
    assert tomllib.loads((out / "config.toml").read_text())["fpdm"]["dtype"] == "fp32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fpdm_pack_dtypes_round_trip(pipe, trained, tmp_path, cli, dtype):
    from safetensors import safe_open

    out = tmp_path / dtype
    done = cli("pack", trained, "--out", out, "--dtype", dtype)
    assert done.returncode == 0, done.stderr
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    assert stored == {torch.bfloat16 if dtype == "bf16" else torch.float16}
    card = (out / "README.md").read_text()
    assert f"fpdm pack {trained} --out {out} --dtype {dtype}" in card and "bright, dark" in card
    assert "| parameters |" in card and f"stored as {dtype}" in card
    loaded = fpdm.load(out, registry=REGISTRY)
    assert loaded.dtype == torch.float32  # stored in half precision, computed in fp32 by default
    images = loaded.sample(n=2, seed=0, **FAST).images
    assert (images - pipe.sample(n=2, seed=0, **FAST).images).abs().max() < 0.25
    done = cli("sample", out, "--n", "2", "--steps", "2", "--iters", "1", "--no-progress", "--out", tmp_path / "s")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "s" / "stats.json").read_text())["checkpoint"] == str(out)


def test_raw_weights_pack_and_load(pipe, trained, tmp_path, cli):
    done = cli("pack", trained, "--out", tmp_path / "raw", "--weights", "raw")
    assert done.returncode == 0, done.stderr
    raw = fpdm.load(tmp_path / "raw", weights="raw", registry=REGISTRY)
    ckpt = load_checkpoint(trained)
    assert all(torch.equal(raw.denoiser.state_dict()[k], v) for k, v in ckpt.model.items())
    with pytest.raises(UsageError, match="holds the raw weights only; load it with weights='raw'"):
        fpdm.load(tmp_path / "raw")
    packed_raw = pipe.save_pretrained(tmp_path / "raw2", weights="raw")  # read from the checkpoint
    assert torch.equal(
        load_checkpoint(trained).model["final_layer.linear.weight"],
        fpdm.load(packed_raw, weights="raw").denoiser.state_dict()["final_layer.linear.weight"],
    )


# ------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_through_the_pipeline_and_the_cli(pipe, trained, tmp_path, cli):
    path = pipe.export(ExportConfig(iters=1, verify=False, out=str(tmp_path / "m.onnx")))
    assert path == tmp_path / "m.onnx" and path.stat().st_size > 0
    packed = pipe.save_pretrained(tmp_path / "p")
    done = cli("export", packed, "--onnx", "--iters", "1", "--no-verify", "--json", "-")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(tmp_path / "p-export" / "k1.onnx")  # the packed folder stays as is
    one_line_error(cli("export", trained, "--onnx", "--steps", "3"), "steps and budget only apply to whole_loop")
    one_line_error(cli("export", trained, "--onnx", "--iters", "0"), "iters must be >= 1")


# ------------------------------------------------------------------------------------------- latent models


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    from fpdm.training.loop import train

    root = tmp_path_factory.mktemp("latent")
    rng = np.random.default_rng(0)
    (root / "data" / "tiny_features").mkdir(parents=True)
    (root / "data" / "tiny_labels").mkdir()
    for i in range(8):
        np.save(root / "data" / "tiny_features" / f"{i}.npy", rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
        np.save(root / "data" / "tiny_labels" / f"{i}.npy", np.array([i % 2], dtype=np.int64))
    config = tiny_config(
        root / "data",
        root / "run",
        "data.name=latents",
        "data.channels=4",
        "data.image_size=8",
        "train.steps=2",
        "train.ckpt_every=2",
    )
    train(config, registry=REGISTRY, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from fpdm.io.vae_weights import save_vae
    from fpdm.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=8, latent_channels=4)).eval()
    return model, save_vae(model, tmp_path_factory.mktemp("vae") / "vae")


def test_a_latent_model_decodes_through_a_vae(latent_run, vae, trained):
    model, folder = vae
    pipe = fpdm.load(latent_run, registry=REGISTRY)
    assert pipe.is_latent
    latents = pipe.sample(n=2, output_type="latent", **FAST).images
    assert latents.shape == (2, 4, 8, 8)
    pils = pipe.sample(n=2, output_type="pil", vae=folder, **FAST).images
    assert pils[0].size == (16, 16) and pils[0].mode == "RGB"
    from_folder = pipe.sample(n=2, vae=folder, **FAST).images
    assert from_folder.shape == (2, 3, 16, 16) and from_folder.abs().max() <= 1
    assert torch.allclose(pipe.sample(n=2, vae=model, **FAST).images, from_folder, atol=1e-6)
    with pytest.raises(UsageError, match="pass --vae DIR"):
        pipe.sample(n=1, output_type="numpy")
    with pytest.raises(UsageError, match="applies to latent models only"):
        fpdm.load(trained, registry=REGISTRY).sample(n=1, vae=folder)


# ------------------------------------------------------------------------------------------- options and configs


def _config_classes() -> list[type]:
    return [
        cls
        for cls in vars(fpdm.config).values()
        if isinstance(cls, type) and attrs.has(cls) and cls.__module__ == "fpdm.config"
    ]


def _float_fields(cls: type) -> list[str]:
    hints = inspect.get_annotations(cls, eval_str=True)
    return [f.name for f in attrs.fields(cls) if "float" in str(hints.get(f.name))]


def test_every_float_field_of_every_config_refuses_nan_and_inf():
    checked = []
    for cls in _config_classes():
        for name in _float_fields(cls):
            for bad in (math.nan, math.inf, -math.inf):
                with pytest.raises((ValueError, TypeError)):
                    cls(**{name: bad})
            checked.append(f"{cls.__name__}.{name}")
    assert {"TrainConfig.lr", "SolverConfig.tol", "SampleConfig.cfg_scale", "ExportConfig.eta"} <= set(checked)
    for item, field in (
        ("train.lr=nan", "'lr'"),
        ("train.grad_clip=inf", "'grad_clip'"),
        ("model.mlp_ratio=-inf", "'mlp_ratio'"),
        ("solver.tol=inf", "'tol'"),
    ):
        with pytest.raises(UsageError) as info:
            load_config(overrides=[item])
        assert field in _one_line(info)


def test_fpdm_sample_flags(trained, tmp_path, cli):
    out = tmp_path / "s"
    common = ["sample", trained, "--n", "2", "--steps", "2", "--iters", "1", "--no-progress", "--out", out]
    done = cli(*common, "--no-ema", "--json", "-")
    assert done.returncode == 0 and done.stderr.strip() == "fpdm: --no-ema is deprecated; use --weights raw"
    report = json.loads(done.stdout)
    assert report["weights"] == "raw" and report == json.loads((out / "stats.json").read_text())
    one_line_error(cli(*common, "--class", "Sneaker"), "invalid class 'Sneaker'")
    one_line_error(cli(*common, "--n", "0"), "n must be >= 1")
    one_line_error(cli(*common, "--tol", "nan"), "'tol' must be")
    one_line_error(cli(*common, "--cfg-scale", "inf"), "'cfg_scale' must be a finite number")
    one_line_error(cli("sample", tmp_path / "nowhere", "--no-progress"), "model not found")


def test_registry_create_checks_options_against_the_factory():
    with pytest.raises(UsageError) as info:
        REGISTRY.create("sampler", "ddim", bogus=1)
    assert _one_line(info) == "sampler 'ddim' has no option 'bogus'; options: eta"


toml_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
)
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
toml_tables = st.recursive(
    st.dictionaries(toml_keys, toml_values, max_size=4),
    lambda inner: st.dictionaries(toml_keys, st.one_of(toml_values, inner), max_size=3),
    max_leaves=8,
)


@given(toml_tables)
def test_the_toml_writer_round_trips(data):
    assert tomllib.loads(dumps_toml(data)) == data
