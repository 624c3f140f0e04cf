"""Training end to end on tiny CPU configs: checkpoints, exact resume, S-JFB solver choice, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.io.checkpoint import list_checkpoints, load_checkpoint
from fpdm.models.transformer import FPDM
from fpdm.registry import Registry
from fpdm.training.loop import train
from reliability_support import cli
from support import REGISTRY, run_cli, tiny_config


def tiny(images, out, *extra: str):  # type: ignore[no-untyped-def]
    return tiny_config(images, out, *extra)


def weights(path):  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(path)
    return ckpt.model, ckpt.ema


def test_train_writes_checkpoints_metrics_and_keeps_the_newest(images, tmp_path):
    result = train(tiny(images, tmp_path / "run", "train.keep_checkpoints=1"), registry=REGISTRY, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000006"]
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 6 and ckpt.config["model"]["hidden_size"] == 32
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6] and all(r["loss"] > 0 for r in lines)
    assert {"mse", "vb", "fp_residual", "img_per_s", "no_grad_iters", "grad_iters"} <= set(lines[0])
    assert {"grad_norm", "grad_norm_max", "clipped", "clip_scale", "lr"} <= set(lines[0])
    assert result.checkpoint == ckpt.path


def test_resume_continues_exactly(images, tmp_path):
    train(tiny(images, tmp_path / "straight"), registry=REGISTRY, progress=False)
    train(tiny(images, tmp_path / "split", "train.steps=3"), registry=REGISTRY, progress=False)
    train(tiny(images, tmp_path / "split"), resume=True, registry=REGISTRY, progress=False)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_anderson_and_dit_train(images, tmp_path):
    result = train(
        tiny(images, tmp_path / "a", "solver.name=anderson", "train.no_grad_tol=1e-3"),
        registry=REGISTRY,
        progress=False,
    )
    assert load_checkpoint(result.checkpoint).config["solver"]["name"] == "anderson"
    result = train(
        tiny(images, tmp_path / "d", "model.arch=DiT-XS/2", "model.depth=2"), registry=REGISTRY, progress=False
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_refuses_to_overwrite_or_resume_an_incompatible_run(images, trained, tmp_path):
    shutil.copytree(trained, tmp_path / "r")  # the shared tiny run, 6 steps
    with pytest.raises(UsageError, match="already holds checkpoints"):
        train(tiny(images, tmp_path / "r"), registry=REGISTRY, progress=False)
    with pytest.raises(UsageError, match="trained with model.hidden_size=32, the config says 64"):
        train(tiny(images, tmp_path / "r", "model.hidden_size=64"), resume=True, registry=REGISTRY, progress=False)
    with pytest.raises(UsageError, match="already at step 6"):
        train(tiny(images, tmp_path / "r"), resume=True, registry=REGISTRY, progress=False)


class ExplodingFPDM(FPDM):
    """Goes non-finite from the third call on."""

    calls = 0

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        ExplodingFPDM.calls += 1
        if ExplodingFPDM.calls >= 3:
            return type(out)(out.pred * float("nan"), out.z, out.stats, out.blocks)
        return out


def test_nan_loss_stops_without_a_poisoned_checkpoint(images, tmp_path):
    registry = Registry.load(only=[])
    ExplodingFPDM.calls = 0
    import types

    import fpdm

    registry.add_plugin(
        types.SimpleNamespace(register_denoisers=fpdm.hookimpl(lambda register: register("boom", ExplodingFPDM))),
        name="boom",
    )
    config = tiny(images, tmp_path / "nan", "model.arch=boom-XS/2", "model.pre_depth=1", "train.ckpt_every=2")
    with pytest.raises(
        FpdmRuntimeError, match=r"non-finite values in the loss at step 3 .*last good checkpoint: .*step-00000002"
    ):
        train(config, registry=registry, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "nan" / "checkpoints")] == ["step-00000002"]
    load_checkpoint(tmp_path / "nan")  # intact


def test_a_failed_save_leaves_the_previous_checkpoint(images, tmp_path, monkeypatch):
    train(tiny(images, tmp_path / "s", "train.steps=3"), registry=REGISTRY, progress=False)
    import fpdm.io.checkpoint as ck

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(FpdmRuntimeError, match="could not write checkpoint step 6 .*No space left.*step-00000003"):
        train(tiny(images, tmp_path / "s"), resume=True, registry=REGISTRY, progress=False)
    root = tmp_path / "s" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000003"]  # no temporary folder left behind
    assert load_checkpoint(root).step == 3


def test_corrupt_and_foreign_checkpoints_are_refused(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "c")  # the shared tiny run, corrupted in a copy
    ckpt = list_checkpoints(tmp_path / "c" / "checkpoints")[-1]
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="checksum mismatch.*model.safetensors"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(bytes(data[:100]))
    with pytest.raises(UsageError, match="unreadable weights"):
        load_checkpoint(ckpt, verify=False)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UsageError, match="format 99; this fpdm reads up to 1"):
        load_checkpoint(ckpt)
    with pytest.raises(UsageError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


fpdm_cli = run_cli


@pytest.mark.slow
def test_cli_trains_resumes_and_plots(images, tmp_path):
    common = [
        "--set",
        "model.hidden_size=32",
        "--set",
        "model.num_heads=2",
        "--set",
        "data.name=image_folder",
        "--set",
        f"data.path={json.dumps(str(images))}",
        "--set",
        "data.image_size=8",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.log_every=2",
        "--set",
        "train.no_grad_iters=[0, 2]",
        "--set",
        "train.grad_iters=[1, 2]",
        "--out",
        str(tmp_path / "cli"),
        "--no-progress",
    ]
    first = fpdm_cli("train", "--plugin", "anderson", "--steps", "4", *common)
    assert first.returncode == 0, first.stderr
    assert "loss curve" in first.stdout and (tmp_path / "cli" / "loss.png").is_file()
    again = fpdm_cli("train", "--resume", "--steps", "6", "--out", str(tmp_path / "cli"), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(tmp_path / "cli").step == 6
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["solver"]["name"] == "anderson"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lr=-1"], "'lr' must be > 0"),
        (["--set", "model.pre_depth=-1"], "'pre_depth' must be >= 0"),
        (["--set", "train.grad_iters=[5, 2]"], "'grad_iters' must satisfy 0 <= min <= max"),
        (["--set", "train.lr_schedule=cos"], "train.lr_schedule: 'cos' is not one of constant, cosine, linear"),
        (["--set", "train.lr='fast'"], "train.lr must be float"),
        (["--set", "train.epochs=3"], "unknown key 'train.epochs'"),
        (["--config", "nope"], "neither a file nor a preset; presets: fashion_mnist"),
        (["--set", "data.name=image_folder", "--set", "data.path='/no/such/dir'"], "/no/such/dir"),
        (["--plugin", "nosuch"], "unknown solver 'nosuch'"),
        (["--set", "model.arch='FPDM-XXL/2'"], "bad model arch"),
        (["--resume", "--out", "/no/such/run"], "nothing to resume"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message, tmp_path):
    code, out, err = cli("train", "--out", str(tmp_path / "bad"), "--steps", "1", "--no-progress", *args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_compiled_blocks_train_and_save_plain_state_dicts(images, tmp_path):
    train(tiny(images, tmp_path / "c", "train.compile=true", "train.steps=3"), registry=REGISTRY, progress=False)
    ckpt = load_checkpoint(tmp_path / "c")
    assert not any("_orig_mod" in key for key in ckpt.model)  # per-block compile keeps the official names
    assert (
        ckpt.model.keys()
        == FPDM(input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, num_classes=2)
        .state_dict()
        .keys()
    )
