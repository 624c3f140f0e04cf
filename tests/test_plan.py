"""Budgets in blocks or DiT steps, and `fpdm plan`: the search on the tiny trained run, a resumed search, stored plans
refused when stale or corrupt, and their use (with its one-line notes) by `fpdm sample` and `Pipeline.sample`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import tomllib
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from fpdm.budget import Budget, dit_depth, parse_budget
from fpdm.config import ExportConfig, SampleConfig, load_config, make_config
from fpdm.diffusion.planner import (
    EXPLICIT,
    PLAN_NAME,
    Grid,
    plan_location,
    read_plans,
    shipped_extractor_sha256,
    write_plans,
)
from fpdm.errors import UsageError
from fpdm.eval.features import SHIPPED_SHA256
from fpdm.io.checkpoint import sha256_file
from fpdm.models.transformer import SIZES
from fpdm.pipeline import load
from fpdm.planning import CellScore, PlanConfig, plan
from reliability_support import assert_one_line_error, cli
from support import REGISTRY

# A grid of 4 cells under 2dit (12 blocks) for the tiny run: ddim and ddpm at 4 steps x 1 iteration and 3 x 2.
TINY = PlanConfig(
    grid=Grid(samplers=("ddim", "ddpm"), spacings=("official",), iters=(1, 2)), samples=130, rungs=2, batch_size=130
)
TINY_FLAGS = ["--sampler", "ddim", "--sampler", "ddpm", "--spacing", "official", "--iters", "1", "--iters", "2"]
TINY_FLAGS += ["--samples", "130", "--rungs", "2", "--batch-size", "130", "--no-progress"]


# ---------------------------------------------------------------------------------------------- budget units
@given(st.integers(1, 10**6))
def test_a_block_budget_reads_the_same_from_an_int_or_text(n):
    assert parse_budget(n) == parse_budget(str(n)) == parse_budget(f" {n} ") == Budget(n, "blocks")
    assert str(parse_budget(n)) == str(n)
    assert SampleConfig(budget=str(n)).budget == n == ExportConfig(whole_loop=True, steps=1, budget=n).budget


@given(st.integers(1, 10**4), st.sampled_from(sorted(SIZES)), st.sampled_from(["FPDM", "DiT"]))
def test_a_dit_budget_is_that_many_depths_of_the_dit_of_the_model_size(n, size, family):
    config = load_config(overrides=[f"model.arch={family}-{size}/4"])
    budget = parse_budget(f"{n}DiT")
    assert budget == Budget(n, "dit") and str(budget) == f"{n}dit"
    assert budget.blocks(config) == n * SIZES[size][2]
    assert SampleConfig(budget=f"{n}dit").budget == f"{n}dit"


def test_a_dit_counts_its_own_depth_and_an_fpdm_the_size_table():
    assert dit_depth(load_config(overrides=["model.arch=DiT-S/4", "model.depth=3"])) == 3
    assert dit_depth(load_config(overrides=["model.arch=FPDM-S/4", "model.depth=3"])) == SIZES["S"][2]


@given(st.one_of(st.text(max_size=8), st.integers(max_value=0), st.booleans(), st.floats()))
def test_a_bad_budget_is_one_line_naming_the_forms(value):
    valid = re.fullmatch(r"\s*(\d+)\s*(dit)?\s*", value, re.IGNORECASE) if isinstance(value, str) else None
    assume(valid is None or int(valid[1]) < 1)
    with pytest.raises(UsageError) as error:
        make_config(SampleConfig, budget=value)
    message = str(error.value)
    assert "\n" not in message and "e.g. 60" in message and "e.g. 10dit" in message


def test_the_budget_flag_refuses_bad_text_while_parsing():
    code, _, err = cli("sample", "nowhere", "--budget", "ten")
    assert_one_line_error(code, err, expect="invalid budget 'ten'", codes=(2,))


def test_sampling_resolves_a_dit_budget_and_states_the_minimum_in_blocks(trained):
    pipe = load(trained, device="cpu", registry=REGISTRY)  # FPDM-XS/2: one DiT step is DiT-XS's 6 blocks
    out = pipe.sample(n=2, steps=3, budget="2dit", sampler="ddim")
    assert out.blocks.tolist() == [12, 12] and sum(out.plan["iterations"]) == 12 - 3 * 2
    assert (out.plan["budget"], out.plan["budget_blocks"]) == ("2dit", 12)
    with pytest.raises(UsageError, match=r"9 in all \(1dit = 6 blocks; ddim at 3 steps makes 3 model evaluations\)"):
        pipe.sample(n=1, steps=3, budget="1dit", sampler="ddim")


# ---------------------------------------------------------------------------------------------- the search
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """130 gray 8x8 images like the trained run's (its folder holds 24: FID on 128-d features needs 129)."""
    root = tmp_path_factory.mktemp("plan-ref")
    gen = torch.Generator().manual_seed(1)
    for i in range(130):
        level = 200 if i % 2 else 60
        pixels = (level + 30 * torch.randn(8, 8, generator=gen)).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / f"{i}.png")
    return root


def copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to)
    return to


@pytest.fixture(scope="module")
def planned(trained, reference, tmp_path_factory):
    """A copy of the trained run, planned for 2dit by `fpdm plan` (in-process)."""
    run = copy_run(trained, tmp_path_factory.mktemp("planned") / "run")
    code, out, err = cli("plan", str(run), "--budget", "2dit", "--ref", str(reference), *TINY_FLAGS)
    assert code == 0, err
    assert out.splitlines()[-1] == f"plan: {run / PLAN_NAME}"
    return run


def entry_of(run: Path, budget: str = "2dit") -> dict:
    return tomllib.loads((run / PLAN_NAME).read_text())["budgets"][budget]


def test_the_plan_holds_the_choice_every_score_the_grid_and_what_it_was_made_with(planned, reference):
    entry = entry_of(planned)
    chosen, candidates = entry["chosen"], entry["candidates"]
    assert [r["samples"] for r in entry["rungs"]] == [130, 260] and entry["ranked_by"] == ["kid", "kid"]
    assert [c["rung"] for c in candidates] == [0] * entry["grid"]["cells"] + [1] * 2  # the best half of 4 cells
    last = [c for c in candidates if c["rung"] == 1]
    assert chosen["score"] == min(c["kid_mean"] for c in last)
    assert {k: chosen[k] for k in ("sampler", "steps", "iterations")} in [
        {k: c[k] for k in ("sampler", "steps", "iterations")} for c in last
    ]
    assert all(c["blocks_mean"] == 12 == entry["blocks"] for c in candidates) and entry["dit_depth"] == 6
    assert entry["weights_sha256"] == sha256_file(sorted((planned / "checkpoints").iterdir())[-1] / "ema.safetensors")
    assert entry["extractor_sha256"] == SHIPPED_SHA256 == shipped_extractor_sha256()
    assert entry["grid"]["samplers"] == ["ddim", "ddpm"] and entry["reference"] == str(reference)
    assert entry["command"].startswith(f"fpdm plan {planned} --budget 2dit --sampler ddim")
    assert not (planned / "plan.cache.jsonl").exists()  # the cell cache goes once the plan is written


def test_an_interrupted_plan_resumes_from_its_finished_cells(trained, reference, planned, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    config = PlanConfig(grid=TINY.grid, samples=130, rungs=2, batch_size=130, ref=str(reference))
    seen: list[CellScore] = []

    def interrupt(score: CellScore) -> None:
        seen.append(score)
        if len(seen) == 3:
            raise KeyboardInterrupt  # as a user's ctrl-c after three cells

    with pytest.raises(KeyboardInterrupt):
        plan(run, ["2dit"], config, progress=False, callback=interrupt)
    assert not (run / PLAN_NAME).exists() and len((run / "plan.cache.jsonl").read_text().splitlines()) == 3
    resumed: list[CellScore] = []
    result = plan(run, ["2dit"], config, progress=False, callback=resumed.append)
    assert [s.cached for s in resumed] == [True] * 3 + [False] * (len(resumed) - 3)
    assert [(s.cell, s.scores) for s in resumed[:3]] == [(s.cell, s.scores) for s in seen]
    assert result.entries["2dit"]["chosen"] == entry_of(planned)["chosen"]  # the same search, the same choice
    assert not (run / "plan.cache.jsonl").exists()


def test_plan_refuses_before_sampling(trained, reference, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    refused = {
        "budget 2 cannot pay one step of any sampler in the grid; the least is 3 blocks (ddim at 1 step)": (
            ["2"],
            TINY,
        ),
        "unknown sampler 'nope'; known: ddim, ddpm": (["2dit"], PlanConfig(grid=Grid(samplers=("nope",)))),
        "unknown spacing 'wide'; known: official, linspace": (["2dit"], PlanConfig(grid=Grid(spacings=("wide",)))),
        "samples must be > 128": (["2dit"], PlanConfig(samples=128)),
        "give each budget once": (["12", "12"], TINY),
    }
    for message, (budgets, config) in refused.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            plan(run, budgets, config, progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in trained.iterdir())  # nothing written


# ---------------------------------------------------------------------------------------------- using a plan
def sample(run: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    return cli("sample", str(run), "--budget", "2dit", "--n", "2", "--no-progress", "--out", str(out), *flags)


def test_sample_uses_the_plan_for_its_exact_budget_and_says_so(planned, tmp_path):
    chosen = entry_of(planned)["chosen"]
    code, _, err = sample(planned, tmp_path / "s")
    assert code == 0, err
    assert err.splitlines() == [
        f"fpdm: budget 2dit: using the plan in {planned / PLAN_NAME}: {chosen['sampler']}, {chosen['steps']} steps "
        f"(official), {chosen['allocator']} allocation, fixed_point, reuse"
    ]
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert (stats["sampler"], stats["steps"], stats["iterations_plan"]) == (
        chosen["sampler"],
        chosen["steps"],
        chosen["iterations"],
    )
    assert stats["stored_plan"] == str(planned / PLAN_NAME) and stats["budget_blocks"] == 12
    code, _, err = cli("sample", str(planned), "--budget", "12", "--n", "2", "--steps", "2", "--no-progress")
    assert code == 0 and err == ""  # 12 blocks is not the text "2dit": no plan for it


@pytest.mark.parametrize(
    "flags",
    [
        ["--steps", "4"],
        ["--sampler", "ddim", "--spacing", "trailing", "--steps", "3"],
        ["--steps", "2", "--iters", "1"],
    ],
)
def test_an_explicit_sampling_flag_drops_the_whole_plan_in_one_line(planned, tmp_path, flags):
    code, _, err = sample(planned, tmp_path / "s", *flags)
    assert code == 0, err
    given = ", ".join(name for name in EXPLICIT if f"--{name}" in flags)
    assert err.splitlines() == [f"fpdm: {given} given: the plan for budget 2dit in {planned / PLAN_NAME} is not used"]


def test_pipeline_sample_uses_the_plan_unless_told_not_to(planned, capsys):
    pipe = load(planned, device="cpu", registry=REGISTRY)
    chosen = entry_of(planned)["chosen"]
    out = pipe.sample(n=1, budget="2dit")
    assert (out.plan["sampler"], out.plan["steps"]) == (chosen["sampler"], chosen["steps"])
    assert "using the plan" in capsys.readouterr().err
    assert pipe.sample(n=1, budget="2dit", steps=4, plan=False).plan["stored_plan"] is None
    assert capsys.readouterr().err == ""


def test_a_plan_file_elsewhere_is_used_through_plan_file(planned, tmp_path):
    run = copy_run(planned, tmp_path / "run")
    (run / PLAN_NAME).rename(tmp_path / "elsewhere.toml")
    code, _, err = sample(run, tmp_path / "s", "--plan", str(tmp_path / "elsewhere.toml"))
    assert code == 0 and err.startswith(f"fpdm: budget 2dit: using the plan in {tmp_path / 'elsewhere.toml'}")
    code, _, err = sample(run, tmp_path / "s", "--plan", str(tmp_path / "missing.toml"))
    assert_one_line_error(code, err, expect="plan file not found", codes=(2,))


def test_a_packed_folder_keeps_its_plan_in_its_config(planned, tmp_path):
    pipe = load(planned, device="cpu", registry=REGISTRY)
    packed = pipe.save_pretrained(tmp_path / "packed")
    location = plan_location(packed, "packed", "ema")
    entry = {**entry_of(planned), "weights_sha256": sha256_file(location.weights)}
    write_plans(location, {"2dit": entry}, say=print)
    assert read_plans(location)["2dit"]["chosen"] == entry["chosen"]
    loaded = load(packed, device="cpu", registry=REGISTRY)  # its hashes still hold: config.toml is not hashed
    assert loaded.sample(n=1, budget="2dit").plan["stored_plan"] == str(packed / "config.toml")


def _stale(path: Path, key: str, value: str) -> None:
    text = path.read_text()
    path.write_text(re.sub(rf'^{key} = "[0-9a-f]+"$', f'{key} = "{value}"', text, count=1, flags=re.M))


@pytest.mark.parametrize(
    ("spoil", "expect"),
    [
        (lambda p: p.write_text("not [ toml"), "is corrupt (unreadable"),
        (lambda p: p.write_text('format = "something-else"\n'), "is corrupt (no format = 'fpdm-plan')"),
        (
            lambda p: p.write_text(p.read_text().replace(".chosen]\nsampler", ".chosen]\nsamplr")),
            "corrupt (bad or missing",
        ),
        (lambda p: _stale(p, "weights_sha256", "0" * 64), "was made for other weights (sha256 000000000000"),
        (lambda p: _stale(p, "extractor_sha256", "0" * 64), "was scored with another feature extractor"),
    ],
    ids=["unreadable", "foreign", "malformed", "other-weights", "other-extractor"],
)
def test_a_corrupt_or_stale_plan_is_refused_with_the_command_remaking_it(planned, tmp_path, spoil, expect):
    run = copy_run(planned, tmp_path / "run")
    spoil(run / PLAN_NAME)
    code, _, err = sample(run, tmp_path / "s")
    assert_one_line_error(code, err, expect=expect, codes=(2,))
    assert re.search(r"remake it: fpdm plan \S+ --budget 2dit", err)
    assert not (tmp_path / "s").exists()  # refused before anything was sampled
    code, _, err = sample(run, tmp_path / "s", "--no-plan", "--steps", "3")
    assert code == 0 and "not used" not in err
