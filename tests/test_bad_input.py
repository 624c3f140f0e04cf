"""Bad input, systematically, at every `fpdm` command: malformed TOML, wrong types, unknown keys, out-of-range
values, bad flag combinations, missing / empty / corrupt data, truncated and foreign checkpoints and ONNX files.
Every case must end with exit code 2 (input) or 1 (run time) and ONE stderr line naming the problem, with no
traceback. The CLI runs in-process (apps.cli.main) so hundreds of cases stay cheap; the counts go to README."""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path

import attrs
import numpy as np
import pytest
import tomllib
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fpdm.config import Config
from fpdm.io.checkpoint import list_checkpoints, sha256_file
from reliability_support import assert_one_line_error, cli, flush_counts

SLOW_OK = settings(
    max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None
)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():  # type: ignore[no-untyped-def]
    yield
    flush_counts()


def expect_error(*argv: str, expect: str | None = None, codes: tuple[int, ...] = (1, 2)) -> None:
    code, _, err = cli(*argv)
    try:
        assert_one_line_error(code, err, expect=expect, codes=codes)
    except AssertionError as exc:  # say which case failed: most tests loop over many
        raise AssertionError(f"fpdm {' '.join(argv)}: {exc}") from None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):  # type: ignore[no-untyped-def]
    return tmp_path_factory.mktemp("bad")


def _reseal(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"] = {name: sha256_file(ckpt / name) for name in meta["sha256"] if (ckpt / name).is_file()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return list_checkpoints(dest / "checkpoints")[-1]


# ------------------------------------------------------------------------------------------- configs (TOML, --set)

# Out-of-range values, field by field (the validators' edges), and a few cross-field impossibilities.
OUT_OF_RANGE = [
    ("solver.max_iter", "-1"),
    ("solver.tol", "-1e-3"),
    ("solver.check_every", "0"),
    ("model.hidden_size", "3"),
    ("model.num_heads", "0"),
    ("model.depth", "0"),
    ("model.pre_depth", "-1"),
    ("model.post_depth", "-2"),
    ("model.mlp_ratio", "0"),
    ("diffusion.num_train_timesteps", "0"),
    ("diffusion.prediction", "'x0'"),
    ("train.steps", "0"),
    ("train.batch_size", "0"),
    ("train.lr", "0"),
    ("train.weight_decay", "-0.1"),
    ("train.grad_clip", "-1"),
    ("train.ema_decay", "1.0"),
    ("train.ema_decay", "-0.5"),
    ("train.skip_nonfinite", "-1"),
    ("train.no_grad_iters", "[3, 1]"),
    ("train.grad_iters", "[-1, 2]"),
    ("train.grad_iters", "[1]"),
    ("train.grad_iters", "[1, 2, 3]"),
    ("train.no_grad_tol", "-1"),
    ("train.precision", "'fp8'"),
    ("train.seed", "-1"),
    ("train.log_every", "0"),
    ("train.ckpt_every", "0"),
    ("train.keep_checkpoints", "0"),
    ("train.label_dropout", "1.5"),
    ("train.label_dropout", "-0.1"),
    ("data.image_size", "0"),
    ("data.channels", "2"),
    ("model.arch", "'FPDM-XS/0'"),
    ("model.arch", "'FPDM'"),
    ("model.arch", "'nosuch-XS/2'"),
    ("diffusion.schedule", "'nosuch'"),
    ("solver.name", "'nosuch'"),
    ("solver.options.m", "0"),
    ("diffusion.options.beta_start", "-1"),
    ("data.name", "'nosuch'"),
    ("train.device", "'tpu'"),
    ("train.device", "'cuda:99'"),
]


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
def test_out_of_range_config_values(key, value, scratch):
    steps = [] if key == "train.steps" else ["--steps", "1"]  # a case that slipped through trains one step at most
    expect_error(
        "train",
        "--out",
        str(scratch / "never" / key / value),
        "--no-progress",
        *steps,
        "--set",
        f"{key}={value}",
        codes=(2,),
    )


def test_cross_field_impossibilities(images, scratch):
    base = [
        "train",
        "--out",
        str(scratch / "never2"),
        "--no-progress",
        "--set",
        "data.name=image_folder",
        "--set",
        f"data.path={json.dumps(str(images))}",
        "--set",
        "data.image_size=8",
    ]
    expect_error(
        *base, "--set", "model.hidden_size=30", "--set", "model.num_heads=4", codes=(2,)
    )  # heads do not divide
    expect_error(*base, "--set", "model.arch=FPDM-XS/3", codes=(2,))  # patch does not divide the image
    expect_error(*base, "--set", "train.batch_size=1000", expect="fewer than train.batch_size", codes=(2,))
    expect_error(*base, "--set", "data.channels=3", "--set", "model.arch=FPDM-XS/2", codes=(2,))


def _fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, type hint) of every plain field of the config tree, options tables (Any) left out."""
    import typing

    out = []
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        hint = hints[field.name]
        if attrs.has(hint):
            out += _fields(hint, f"{prefix}{field.name}.")
        elif field.name != "options":
            out.append((f"{prefix}{field.name}", hint))
    return out


FIELDS = _fields(Config)


def _wrong_value(hint: object) -> st.SearchStrategy[str]:
    """A TOML literal of a type the field does not take."""
    text = str(hint)
    wrong = [st.just("[1, 2]"), st.just("{a = 1}")]
    if "bool" not in text:
        wrong += [st.sampled_from(["true", "false"])]
    if "int" not in text and "float" not in text:
        wrong += [st.integers(-5, 5).map(str), st.floats(-2, 2, allow_nan=False).map(repr)]
    if "str" not in text:
        wrong += [
            st.text(string.ascii_letters, min_size=1, max_size=6).filter(
                lambda s: s not in ("true", "false", "inf", "nan")
            )
        ]
    if "int" in text and "float" not in text and "list" not in text:
        wrong += [st.just("1.5")]
    if "list" in text:
        wrong = [st.just("3"), st.just("'a'"), st.just("[1.5, 2]"), st.just("[true, 1]")]
    return st.one_of(wrong)


@SLOW_OK
@given(data=st.data())
def test_wrong_types_anywhere_in_the_config(data, scratch):
    key, hint = data.draw(st.sampled_from(FIELDS))
    value = data.draw(_wrong_value(hint))
    steps = [] if key == "train.steps" else ["--steps", "1"]  # a case that slipped through trains one step at most
    expect_error(
        "train",
        "--out",
        str(scratch / "never3"),
        "--no-progress",
        *steps,
        "--set",
        f"{key}={value}",
        codes=(2,),
        expect=key.split(".")[-1] if "{" not in value else None,
    )


IDENT = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10)


@SLOW_OK
@given(section=st.sampled_from(["", "model.", "diffusion.", "data.", "solver.", "train."]), name=IDENT)
def test_unknown_keys_are_named(section, name, scratch):
    import typing

    tree = Config if not section else typing.get_type_hints(Config)[section[:-1]]
    known = {f.name for f in attrs.fields(tree)}
    assume(name not in known)
    for command in (["solve"], ["train", "--out", str(scratch / "never4"), "--no-progress", "--steps", "1"]):
        expect_error(*command, "--set", f"{section}{name}=1", expect=f"unknown key '{section}{name}'", codes=(2,))


@SLOW_OK
@given(text=st.text(min_size=1, max_size=60))
def test_malformed_toml_files(text):
    try:
        tomllib.loads(text)
        assume(False)  # valid TOML is another test's business
    except tomllib.TOMLDecodeError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.toml"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))  # lone surrogates: undecodable bytes
        expect_error("solve", "--config", str(path), expect="bad.toml", codes=(2,))
        expect_error(
            "train",
            "--config",
            str(path),
            "--out",
            str(Path(tmp) / "r"),
            "--no-progress",
            expect="bad.toml",
            codes=(2,),
        )


def test_unreadable_config_files(scratch):
    binary = scratch / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    folder = scratch / "folder.toml"
    folder.mkdir()
    structural = scratch / "structural.toml"
    structural.write_text("model = 3\n")
    for path in (binary, folder, structural):
        expect_error("solve", "--config", str(path), codes=(2,))
        expect_error("train", "--config", str(path), "--out", str(scratch / "never5"), codes=(2,))
    expect_error("solve", "--set", "solver=3", codes=(2,))
    expect_error("solve", "--set", "solver.max_iter.x=3", codes=(2,))
    expect_error("solve", "--set", "=3", codes=(2,))


# ------------------------------------------------------------------------------------------- data


def test_missing_empty_and_corrupt_data(scratch):
    empty = scratch / "empty"
    empty.mkdir()
    corrupt = scratch / "corrupt" / "cls"
    corrupt.mkdir(parents=True)
    (corrupt / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (corrupt / "b.png").write_bytes(b"")
    idx = scratch / "idx"
    idx.mkdir()
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        (idx / name).write_bytes(b"not gzip at all")
    latents = scratch / "latents"
    (latents / "x_features").mkdir(parents=True)
    (latents / "x_labels").mkdir()
    (latents / "x_features" / "0.npy").write_bytes(b"garbage")
    np.save(latents / "x_labels" / "0.npy", np.array([0]))
    out = ["--out", str(scratch / "never6"), "--no-progress", "--steps", "1"]
    cases = [
        ["--set", "data.name=image_folder"],
        ["--set", "data.name=image_folder", "--set", "data.path='/no/such/folder'"],
        ["--set", "data.name=image_folder", "--set", f"data.path={json.dumps(str(empty))}"],
        ["--set", "data.name=image_folder", "--set", f"data.path={json.dumps(str(corrupt.parent))}"],
        ["--set", "data.name=image_folder", "--set", f"data.path={json.dumps(str(corrupt / 'b.png'))}"],
        ["--set", "data.name=fashion_mnist", "--set", f"data.path={json.dumps(str(empty))}"],
        ["--set", "data.name=fashion_mnist", "--set", f"data.path={json.dumps(str(idx))}"],
        ["--set", "data.name=latents", "--set", f"data.path={json.dumps(str(empty))}"],
        ["--set", "data.name=latents", "--set", f"data.path={json.dumps(str(latents))}"],
        ["--set", "data.name=latents", "--set", "data.path='/no/such/latents'"],
    ]
    for case in cases:
        expect_error("train", *out, *case)


# ------------------------------------------------------------------------------------------- checkpoints


def _corruptions(trained: Path, root: Path) -> dict[str, Path]:
    """Run folders, each broken in one way a disk, a crash, a careless user or another program breaks them."""
    runs: dict[str, Path] = {}

    def make(name: str, edit) -> None:  # type: ignore[no-untyped-def]
        ckpt = _copy(trained, root / name)
        edit(ckpt)
        runs[name] = root / name

    def cut(file: str, reseal: bool = False):  # type: ignore[no-untyped-def]
        def edit(ckpt: Path) -> None:
            data = (ckpt / file).read_bytes()
            (ckpt / file).write_bytes(data[: len(data) // 3])
            if reseal:
                _reseal(ckpt)

        return edit

    def write(file: str, text: str, reseal: bool = True):  # type: ignore[no-untyped-def]
        def edit(ckpt: Path) -> None:
            (ckpt / file).write_text(text)
            if reseal:
                _reseal(ckpt)

        return edit

    def spec(change):  # type: ignore[no-untyped-def]
        def edit(ckpt: Path) -> None:
            data = json.loads((ckpt / "model.json").read_text())
            change(data)
            (ckpt / "model.json").write_text(json.dumps(data))
            _reseal(ckpt)

        return edit

    for file in ("model.safetensors", "ema.safetensors", "meta.json", "config.json", "model.json", "optimizer.pt"):
        make(f"cut-{file}", cut(file))
    for file in ("model.safetensors", "ema.safetensors", "config.json", "model.json", "optimizer.pt", "trainer.pt"):
        make(f"cut-resealed-{file}", cut(file, reseal=True))
    make("meta-garbage", write("meta.json", "{", reseal=False))
    make("meta-list", write("meta.json", "[1, 2]", reseal=False))
    make("meta-foreign", write("meta.json", json.dumps({"format": "someone-else", "version": 1}), reseal=False))
    make(
        "meta-newer",
        lambda c: (c / "meta.json").write_text(
            json.dumps({**json.loads((c / "meta.json").read_text()), "version": 99})
        ),
    )
    make(
        "meta-no-version",
        lambda c: (c / "meta.json").write_text(
            json.dumps({k: v for k, v in json.loads((c / "meta.json").read_text()).items() if k != "version"})
        ),
    )
    make("file-missing", lambda c: (c / "ema.safetensors").unlink())
    make("config-list", write("config.json", "[1]"))
    make("config-unknown-key", write("config.json", json.dumps({"model": {"wings": 2}})))
    make("spec-unknown-denoiser", spec(lambda d: d.update(denoiser="nosuch")))
    make("spec-wrong-width", spec(lambda d: d["options"].update(hidden_size=64)))
    make("spec-bad-option", spec(lambda d: d["options"].update(bogus=1)))
    make("spec-bad-value", spec(lambda d: d["options"].update(num_heads="four")))
    make("weights-foreign", lambda c: (_foreign_weights(c), _reseal(c)))
    make("weights-pickle", lambda c: (torch.save({"a": torch.zeros(1)}, c / "model.safetensors"), _reseal(c)))
    return runs


def _foreign_weights(ckpt: Path) -> None:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(3, 3)}, ckpt / "model.safetensors")
    save_file({"encoder.weight": torch.zeros(3, 3)}, ckpt / "ema.safetensors")


@pytest.fixture(scope="module")
def broken(trained, scratch):  # type: ignore[no-untyped-def]
    return _corruptions(trained, scratch / "runs")


@pytest.mark.slow
def test_truncated_foreign_and_inconsistent_checkpoints_at_sample_and_export(broken, scratch):
    for name, run in broken.items():
        if name in ("cut-optimizer.pt", "cut-resealed-optimizer.pt", "cut-resealed-trainer.pt"):
            continue  # sampling and export never read the training state; `train --resume` below does
        expect_error(
            "sample", str(run), "--n", "1", "--steps", "2", "--no-progress", "--out", str(scratch / "s"), codes=(2,)
        )
        expect_error("export", str(run), "--onnx", "--no-verify", "--out", str(scratch / "e.onnx"), codes=(2,))


@pytest.mark.slow
def test_truncated_and_foreign_checkpoints_at_resume(broken):
    for name, run in broken.items():
        if name.startswith("spec-"):
            continue  # training rebuilds the model from its config: model.json is for sample and export
        expect_error("train", "--resume", "--out", str(run), "--steps", "50", "--no-progress", codes=(2,))


@pytest.mark.slow
@SLOW_OK
@given(
    file=st.sampled_from(["model.safetensors", "ema.safetensors", "meta.json", "config.json", "model.json"]),
    fraction=st.floats(0.0, 0.999),
    reseal=st.booleans(),
    flip=st.booleans(),
)
def test_checkpoint_files_cut_or_flipped_anywhere(trained, scratch, file, fraction, reseal, flip):
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        ckpt = _copy(trained, Path(tmp) / "run")
        data = bytearray((ckpt / file).read_bytes())
        at = int(fraction * len(data))
        if flip:
            data[at] ^= 0x5A
        else:
            del data[at:]
        (ckpt / file).write_bytes(bytes(data))
        if reseal and file != "meta.json":
            _reseal(ckpt)
        code, _, err = cli(
            "sample", str(ckpt), "--n", "1", "--steps", "2", "--no-progress", "--out", str(Path(tmp) / "s")
        )
        if code == 0:  # a flipped byte inside a JSON string or a float weight can still be a valid checkpoint
            assert reseal and flip
            return
        assert_one_line_error(code, err)


def test_checkpoint_paths_that_are_not_checkpoints(scratch):
    empty = scratch / "emptyrun"
    empty.mkdir()
    a_file = scratch / "a_file"
    a_file.write_text("hello")
    for path in ("/no/such/run", str(empty), str(a_file)):
        expect_error("sample", path, "--no-progress", codes=(2,))
        expect_error("export", path, "--onnx", codes=(2,))
    expect_error("train", "--resume", "--out", str(empty), "--no-progress", codes=(2,))


# ------------------------------------------------------------------------------------------- flags, per command


@pytest.mark.slow
def test_bad_flags_and_combinations(trained, scratch):
    run = str(trained)
    s = ["sample", run, "--no-progress", "--out", str(scratch / "flags")]
    samples_taken = scratch / "taken"
    samples_taken.mkdir()
    (samples_taken / "precious.txt").write_text("x")
    cases = [
        [*s, "--n", "0"],
        [*s, "--n", "-3"],
        [*s, "--batch-size", "0"],
        [*s, "--steps", "0"],
        [*s, "--steps", "5000"],
        [*s, "--n", "abc"],
        [*s, "--budget", "1"],
        [*s, "--budget", "0"],
        [*s, "--budget", "-5"],
        [*s, "--class", "99"],
        [*s, "--class", "-1"],
        [*s, "--sampler", "nosuch"],
        [*s, "--allocator", "nosuch"],
        [*s, "--reuse", "nosuch"],
        [*s, "--solver", "nosuch"],
        [*s, "--eta", "0.5"],
        [*s, "--sampler", "ddim", "--eta", "2"],
        [*s, "--sampler", "ddim", "--eta", "-1"],
        [*s, "--device", "tpu"],
        [*s, "--device", "cuda:99"],
        [*s, "--vae", "/no/such/vae"],
        [*s, "--iters", "-1"],
        [*s, "--tol", "-1"],
        [*s, "--cfg-channels", "0"],
        [*s, "--cfg-channels", "99", "--cfg-scale", "2"],
        [*s, "--budget", "3", "--steps", "2"],
        [*s, "--backend", "nosuch"],
        ["sample", run, "--no-progress", "--out", str(samples_taken)],
        ["sample"],
        ["sample", run, "extra"],
        ["export", run],
        ["export", run, "--format", "nosuch"],
        ["export", run, "--onnx", "--iters", "0"],
        ["export", run, "--onnx", "--whole-loop"],
        ["export", run, "--onnx", "--steps", "4"],
        ["export", run, "--onnx", "--out", str(scratch / "x.txt")],
        ["export", run, "--onnx", "--opset", "5"],
        ["export", run, "--onnx", "--solver", "nosuch"],
        ["export", run, "--onnx", "--whole-loop", "--steps", "0"],
        ["export", run, "--onnx", "--whole-loop", "--steps", "2", "--allocator", "adaptive"],
        ["export", run, "--onnx", "--whole-loop", "--steps", "2", "--budget", "1"],
        ["plugins", "--bogus"],
        ["plugins", "extra"],
        ["solve", "--dim", "0"],
        ["solve", "--rate", "-0.1"],
        ["solve", "--tokens", "-1"],
        ["solve", "--solver", "anderson", "--set", "solver.options.beta=-1"],
        ["solve", "--seed", "x"],
        ["train", "--steps", "0", "--out", str(scratch / "n7")],
        ["train", "--steps", "x"],
        ["train", "--plugin", "nosuch", "--out", str(scratch / "n8")],
        ["train", "--resume", "--out", str(scratch / "nothing-here")],
        ["train", "--device", "tpu", "--out", str(scratch / "n9")],
        ["train", "--out", run, "--no-progress"],  # already holds checkpoints: refuses to overwrite
        ["train", "--resume", "--out", run, "--steps", "3", "--no-progress"],  # already past step 3
        ["train", "--resume", "--out", run, "--set", "model.hidden_size=64", "--steps", "99", "--no-progress"],
        ["nosuch-command"],
        [],
        ["--debug"],
    ]
    for argv in cases:
        expect_error(*argv)


def test_encode_and_import_official_bad_input(scratch, images):
    garbage_vae = scratch / "vae"
    garbage_vae.mkdir()
    (garbage_vae / "config.json").write_text("{not json")
    (garbage_vae / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    half_vae = scratch / "vae2"
    half_vae.mkdir()
    (half_vae / "config.json").write_text(json.dumps({"latent_channels": "four"}))
    enc = ["encode", str(images), str(scratch / "latents-out"), "--no-progress"]
    for argv in (
        [*enc],
        [*enc, "--vae", "/no/such/vae"],
        [*enc, "--vae", str(garbage_vae)],
        [*enc, "--vae", str(half_vae)],
        ["encode", "/no/such/images", str(scratch / "o"), "--vae", str(garbage_vae)],
        ["encode", str(images / "bright" / "0.png"), str(scratch / "o"), "--vae", str(garbage_vae)],
        [*enc, "--vae", str(garbage_vae), "--batch-size", "0"],
        [*enc, "--vae", str(garbage_vae), "--name", "../x"],
        [*enc, "--vae", str(garbage_vae), "--image-size", "abc"],
        [*enc, "--sample", "--mean"],
    ):
        expect_error(*argv)
    pt = scratch / "official"
    pt.mkdir()
    files = {"empty.pt": b"", "garbage.pt": b"\x00\x01 not a checkpoint", "text.pt": b"hello world\n"}
    for name, data in files.items():
        (pt / name).write_bytes(data)
    torch.save([1, 2, 3], pt / "list.pt")
    torch.save({}, pt / "emptydict.pt")
    torch.save({"model": {"x": torch.zeros(1)}}, pt / "foreignkeys.pt")
    torch.save({"model": {"x": "not a tensor"}}, pt / "nontensor.pt")
    data = (pt / "list.pt").read_bytes()
    (pt / "truncated.pt").write_bytes(data[: len(data) // 2])
    taken = scratch / "taken-out"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    out = str(scratch / "imported")
    for name in (*files, "list.pt", "emptydict.pt", "foreignkeys.pt", "nontensor.pt", "truncated.pt"):
        expect_error("import-official", str(pt / name), out, codes=(2,))
    for argv in (
        ["import-official", "/no/such.pt", out],
        ["import-official", str(pt), out],
        ["import-official", str(pt / "foreignkeys.pt"), out, "--arch", "FPDM-ZZ/2"],
        ["import-official", str(pt / "foreignkeys.pt"), out, "--set", "nonsense"],
        ["import-official", str(pt / "foreignkeys.pt"), out, "--weights", "both"],
        ["import-official", str(pt / "foreignkeys.pt"), str(taken)],
        ["import-official"],
    ):
        expect_error(*argv, codes=(2,))


# ------------------------------------------------------------------------------------------- ONNX files


@pytest.fixture(scope="module")
def exported(trained, scratch):  # type: ignore[no-untyped-def]
    path = scratch / "step.onnx"
    code, _, err = cli("export", str(trained), "--onnx", "--iters", "1", "--no-verify", "--out", str(path))
    assert code == 0, err
    return path


@pytest.mark.slow
def test_bad_onnx_files_at_sample(exported, scratch):
    import onnx

    model = onnx.load(str(exported))
    variants: dict[str, bytes] = {"empty": b"", "garbage": b"\x12\x34garbage" * 10}
    data = exported.read_bytes()
    for cut in (0.01, 0.1, 0.5, 0.9, 0.999):
        variants[f"cut{cut}"] = data[: int(cut * len(data))]
    for key in ("fpdm.format", "fpdm.format_version", "fpdm.config", "fpdm.spec", "fpdm.iters"):
        edited = onnx.ModelProto()
        edited.CopyFrom(model)
        kept = [p for p in edited.metadata_props if p.key != key]
        del edited.metadata_props[:]
        edited.metadata_props.extend(kept)
        variants[f"no-{key}"] = edited.SerializeToString()
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        for prop in broken.metadata_props:
            if prop.key == key:
                prop.value = "{not json" if key not in ("fpdm.format", "fpdm.format_version") else "99"
        variants[f"bad-{key}"] = broken.SerializeToString()
    for name, blob in variants.items():
        path = scratch / f"{name}.onnx"
        path.write_bytes(blob)
        expect_error(
            "sample", str(path), "--n", "1", "--steps", "2", "--no-progress", "--out", str(scratch / f"{name}-samples")
        )
    for argv in (
        ["sample", str(exported), "--backend", "torch"],
        ["sample", str(exported), "--steps", "0"],
        ["sample", str(exported), "--n", "0"],
        ["sample", "/no/such/model.onnx"],
    ):
        expect_error(*argv, "--no-progress")


# ------------------------------------------------------------------------------------------- numeric flags, fuzzed


@SLOW_OK
@given(flag=st.sampled_from(["--n", "--batch-size", "--steps", "--budget"]), value=st.integers(-(10**6), 0))
def test_non_positive_counts_at_sample(trained, scratch, flag, value):
    expect_error("sample", str(trained), flag, str(value), "--no-progress", "--out", str(scratch / "fuzz"), codes=(2,))


@SLOW_OK
@given(
    flag=st.sampled_from(
        ["--n", "--steps", "--iters", "--budget", "--eta", "--tol", "--cfg-scale", "--seed", "--class", "--batch-size"]
    ),
    value=st.text(string.ascii_letters + "!@#%", min_size=1, max_size=5),
)
def test_non_numbers_for_numeric_flags(trained, flag, value):
    assume(value.lower() not in ("inf", "nan", "infinity"))
    expect_error("sample", str(trained), flag, value, "--no-progress", codes=(2,), expect="invalid")


# ------------------------------------------------------------------------------------------- as a user runs it


@pytest.mark.slow
def test_a_handful_in_real_processes(trained, scratch):
    """The in-process cases above, spot-checked end to end: nothing else reaches stderr in a real process."""
    from support import run_cli

    bad = scratch / "real.toml"
    bad.write_text("[train\nsteps = 3\n")
    broken = _copy(trained, scratch / "real-run")
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    garbage = scratch / "real.onnx"
    garbage.write_bytes(b"not onnx")
    for argv in (
        ["train", "--config", str(bad)],
        ["sample", str(scratch / "real-run"), "--no-progress"],
        ["sample", str(garbage), "--no-progress"],
    ):
        result = run_cli(*argv)
        assert_one_line_error(result.returncode, result.stderr, codes=(2,))
