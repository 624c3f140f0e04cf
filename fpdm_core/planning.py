"""`fpdm.planning.plan` / `fpdm plan MODEL --budget B ...`: the sampling settings that give the best images under
each budget, found by measuring them on the model, and stored for `fpdm sample --budget B`.

The grid (`fpdm.diffusion.planner.Grid`: sampler x spacing x steps x allocator x solver) is searched by successive
halving (Jamieson & Talwalkar 2016): rung 0 scores every cell the budget can pay on `samples` images; each later
rung keeps the best 1/`reduction`, draws as many new images again (seed + rung, the same for every cell) and
scores each survivor on all its images so far. Scores come from the `fpdm eval` machinery (torch-fidelity through
`fpdm.eval.fidelity`, the shipped fpdm-fmnist-cnn extractor) against the model's training data (train split),
whose features are extracted once per search. Cells are ranked by KID, which is unbiased, below `FID_RANKS_FROM`
images per cell (at a few hundred images FID's bias is larger than the gaps between cells), by FID from there; the
plan records which metric ranked each rung. Every scored cell is one fsynced line of a cache beside the plan, so an
interrupted search resumes without losing a finished cell; the cache goes once every budget's plan is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from fpdm.budget import dit_depth, parse_budget
from fpdm.config import SampleConfig, at_least, make_config
from fpdm.data.images import to_uint8
from fpdm.diffusion.planner import Cell, Grid, PlanLocation, Say, grid_cells, plan_location, write_plans
from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.eval.fidelity import Extractor, check_pair, cnn_extractor, compute_metrics
from fpdm.eval.inputs import ImageSet, load_reference
from fpdm.io.checkpoint import sha256_file
from fpdm.pipeline import Pipeline, load, run_sample

FID_RANKS_FROM = 1000  # images per cell from which FID, not KID, ranks (fpdm eval's "about 1000 or more")
COLUMNS = {"kid": "kid_mean", "fid": "fid"}  # the metric that ranks -> its score's key


@attrs.frozen
class PlanConfig:
    """How `plan` searches: the `grid`; `samples` images per cell at rung 0 (more than the extractor's 128
    features: every score includes FID), `rungs` rungs keeping 1/`reduction` each, seeds `seed`, `seed` + 1, ...
    per rung; `batch_size` images sampled at once. The reference is the model's training data, train split
    (Fashion-MNIST read from `data_dir`, default the run's) or `ref` ("fashion_mnist" or a folder), optionally
    a seeded subset of `ref_n` images. `device` and `weights` load a model given by path."""

    grid: Grid = attrs.field(factory=Grid, validator=v.instance_of(Grid))
    samples: int = attrs.field(default=130, validator=at_least(1))
    rungs: int = attrs.field(default=3, validator=at_least(1))
    reduction: int = attrs.field(default=3, validator=at_least(2))
    seed: int = attrs.field(default=0, validator=at_least(0))
    batch_size: int = attrs.field(default=260, validator=at_least(1))
    ref: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    ref_n: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    data_dir: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    device: str = attrs.field(default="auto", validator=v.instance_of(str))
    weights: str = attrs.field(default="ema", validator=v.in_(("ema", "raw")))


@dataclasses.dataclass(frozen=True)
class CellScore:
    """A scored cell, as `plan(callback=...)` sees it; `cached` when an earlier, interrupted search scored it."""

    budget: str
    cell: Cell
    rung: int
    n: int
    seed: int
    scores: dict[str, Any]  # kid_mean, kid_std, fid, blocks_mean, seconds; or error
    cached: bool


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """The plan file written and its entry per budget, as stored (chosen, candidates, grid, hashes, command)."""

    path: Path
    entries: dict[str, dict[str, Any]]
    seconds: float

    def lines(self) -> list[str]:
        """The human-readable summary: one line per budget, then the file."""
        out = []
        for budget, entry in self.entries.items():
            c = entry["chosen"]
            out.append(
                f"budget {budget} ({entry['blocks']} blocks): {c['sampler']}, {c['steps']} steps ({c['spacing']}), "
                f"{c['allocator']}, {c['solver']}: {c['metric'].upper()} {c['score']:.5g} on {c['n']} images "
                f"(best of {entry['grid']['cells']} cells)"
            )
        return [*out, f"plan: {self.path}"]


def plan(
    model: str | Path | Pipeline,
    budgets: Sequence[str | int],
    config: PlanConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    log: Say | None = None,
    callback: Callable[[CellScore], None] | None = None,
    command: str | None = None,
) -> PlanResult:
    """Search `config` under each of `budgets` (60 blocks, "10dit", ...) and store the best settings of each.
    `model`: a run, checkpoint or packed folder, or a Pipeline loaded from one. `out`: the plan file (default:
    RUN/plan.toml, or the [plan] table of a packed folder's config.toml). `callback` sees every scored cell;
    `command` is what the plan records as the way to remake it (default: the `fpdm plan` command). `log` gets
    notes (default: stderr with `progress`). Every refusal comes before anything is sampled."""
    config = config or PlanConfig()
    start = time.perf_counter()
    keys = [str(parse_budget(b)) for b in budgets]
    if not keys or len(set(keys)) < len(keys):
        raise UsageError(f"give each budget once (--budget B, repeatable), got {list(budgets)!r}")
    say = log or ((lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None))
    if isinstance(model, Pipeline):
        pipe, config = model, attrs.evolve(config, weights=model.weights)
    else:
        pipe = load(model, device=config.device, weights=config.weights)
    location = plan_location(pipe.path, pipe.kind, pipe.weights, file=out)
    named = location.model if isinstance(model, Pipeline) else str(model)
    search = _Search(pipe, config, location, keys, say=say, callback=callback)
    entries = search.run(command or _command(named, keys, config, out), progress=progress)
    return PlanResult(location.file, entries, time.perf_counter() - start)


class _Search:
    """Successive halving under each budget, every refusal made by the constructor, scores through the cache."""

    def __init__(
        self,
        pipe: Pipeline,
        config: PlanConfig,
        location: PlanLocation,
        budgets: list[str],
        *,
        say: Say,
        callback: Callable[[CellScore], None] | None,
    ) -> None:
        self.pipe, self.config, self.location, self.say, self.callback = pipe, config, location, say, callback
        self.extractor = cnn_extractor()  # the shipped one, sha256-checked
        if pipe.is_latent:
            raise UsageError("fpdm plan scores pixel-space models; a latent model's samples need a VAE first")
        if config.samples <= self.extractor.features:
            raise UsageError(
                f"samples must be > {self.extractor.features}: every score includes FID on {self.extractor.kind} "
                f"features ({self.extractor.features}-d), which needs a full-rank covariance"
            )
        self.grids = {
            b: grid_cells(pipe.config, pipe.denoiser, pipe.registry, b, config.grid, say=say) for b in budgets
        }
        self.reference = _reference(pipe, config)
        model: Any = pipe.denoiser  # FPDM and DiT carry in_channels / input_size; the interface leaves them out
        shape = (model.in_channels, model.input_size, model.input_size)
        planned = self.reference.images.new_zeros(1, *shape).expand(config.samples, *shape)  # its shape only
        check_pair(planned, self.reference.images, extractor=self.extractor)
        self.identity = {
            "weights": sha256_file(location.weights),
            "extractor": _sha(self.extractor),
            "reference": self.reference.source,
        }
        self.cache = _Cache(location.cache)  # fails here, before sampling, where the plan cannot be written
        self.features = Path()  # torch-fidelity's cache of the reference features, set by `run`
        self.bar: Any = None
        self.drawn: dict[tuple[Cell, int], tuple[Tensor, Tensor]] = {}  # (cell, rung) -> its draw, while needed

    def run(self, command: str, *, progress: bool) -> dict[str, dict[str, Any]]:
        """Every budget's entry, each written to the plan as soon as it is done."""
        from tqdm.auto import tqdm

        entries: dict[str, dict[str, Any]] = {}
        total = sum(_scored_cells(len(cells), self.config) for cells, _ in self.grids.values())
        with (
            tempfile.TemporaryDirectory(prefix="fpdm-plan-") as features,
            tqdm(total=total, unit="cell", disable=not progress) as bar,
        ):
            self.features, self.bar = Path(features), bar
            try:
                for budget, (cells, skipped) in self.grids.items():
                    began = time.perf_counter()
                    entry = self.budget(budget, cells)
                    entry.update(
                        grid={**_grid_record(self.config), "cells": len(cells), "skipped": skipped},
                        weights=str(self.location.weights),
                        weights_sha256=self.identity["weights"],
                        step=self.pipe.step,
                        extractor=self.extractor.kind,
                        extractor_sha256=self.identity["extractor"],
                        reference=self.reference.source,
                        command=command,
                        seconds=time.perf_counter() - began,
                    )
                    write_plans(self.location, {budget: entry}, say=self.say)  # usable at once
                    entries[budget] = entry
            finally:
                self.cache.close(remove=len(entries) == len(self.grids))  # kept for a resume until all are written
        return entries

    def budget(self, budget: str, cells: list[Cell]) -> dict[str, Any]:
        """Successive halving over `cells`: the entry without its provenance."""
        blocks = parse_budget(budget).blocks(self.pipe.config)
        survivors, candidates, rungs = cells, [], []
        for rung in range(self.config.rungs):
            n = self.config.samples * 2**rung  # rung r adds draw r (seed + r) to the images of rung r - 1
            metric = "fid" if n >= FID_RANKS_FROM else "kid"
            scored = sorted(
                ((cell, self.score(budget, blocks, cell, rung)) for cell in survivors),
                key=lambda pair: math.inf if "error" in pair[1] else pair[1][COLUMNS[metric]],
            )
            seeds = [self.config.seed + r for r in range(rung + 1)]
            rungs.append({"rung": rung, "samples": n, "seeds": seeds, "cells": len(scored), "metric": metric})
            candidates += [{**c.settings(), "iterations": list(c.iterations), "rung": rung, **s} for c, s in scored]
            keep = math.ceil(len(scored) / self.config.reduction)
            if rung == self.config.rungs - 1 or keep == 1:  # more images cannot change a choice of one
                break
            survivors = [cell for cell, _ in scored[:keep]]
            self.drawn = {key: images for key, images in self.drawn.items() if key[0] in survivors}
        self.drawn = {}
        best, scores = scored[0]
        if "error" in scores:
            raise FpdmRuntimeError(f"every cell failed under budget {budget}: {scores['error']}")
        chosen = {**best.settings(), "iterations": list(best.iterations), "metric": metric}
        return {
            "budget": budget,
            "unit": parse_budget(budget).unit,
            "blocks": blocks,
            "dit_depth": dit_depth(self.pipe.config),
            "chosen": {**chosen, "score": scores[COLUMNS[metric]], "n": n},
            "ranked_by": [r["metric"] for r in rungs],
            "rungs": rungs,
            "candidates": candidates,
        }

    def score(self, budget: str, blocks: int, cell: Cell, rung: int) -> dict[str, Any]:
        """The cell's scores on the images of rungs 0..`rung`: cached by an earlier search, or measured now."""
        n = self.config.samples * 2**rung
        identity = {**self.identity, "budget": budget, "cell": cell.key, "n": n, "seed": self.config.seed}
        scores = self.cache.get(identity)
        cached = scores is not None
        if scores is None:
            scores = self.measure(cell, blocks, rung)
            self.cache.put(identity, scores)
        self.bar.set_postfix_str(f"{budget} rung {rung}", refresh=False)
        self.bar.update(1)
        if self.callback is not None:
            self.callback(CellScore(budget, cell, rung, n, self.config.seed + rung, scores, cached))
        return scores

    def measure(self, cell: Cell, blocks: int, rung: int) -> dict[str, Any]:
        """Draw what rung `rung` adds (and earlier draws a resumed search no longer holds), then score them all."""
        began = time.perf_counter()
        try:
            draws = [self.draw(cell, blocks, r) for r in range(rung + 1)]
        except FpdmRuntimeError as exc:  # a diverging sampler: ranked last, the search goes on
            return {"error": str(exc).splitlines()[0]}
        images = torch.cat([images for images, _ in draws])  # (n, C, H, W) uint8
        metrics = compute_metrics(
            images,
            self.reference.images,
            extractor=self.extractor,
            seed=self.config.seed,
            prc=False,
            device=None if self.config.device == "auto" else self.config.device,
            reference_key=f"plan-reference-{self.identity['extractor'][:16]}",
            cache_dir=self.features,
        )
        return {
            "kid_mean": metrics["kid_mean"],
            "kid_std": metrics["kid_std"],
            "fid": metrics["fid"],
            "blocks_mean": torch.cat([blocks for _, blocks in draws]).double().mean().item(),
            "seconds": time.perf_counter() - began,
        }

    def draw(self, cell: Cell, blocks: int, rung: int) -> tuple[Tensor, Tensor]:
        """Rung `rung`'s new images of `cell` (uint8 (n, C, H, W)) and the blocks each cost, from seed + rung."""
        key = (cell, rung)
        if key not in self.drawn:
            n = self.config.samples * 2 ** max(rung - 1, 0)  # rung 0 draws `samples`, then each doubles the total
            options = make_config(
                SampleConfig,
                n=n,
                batch_size=self.config.batch_size,
                seed=self.config.seed + rung,
                budget=blocks,
                **cell.settings(),
            )
            out = run_sample(self.pipe, options, plan=False)
            self.drawn[key] = (to_uint8(out.images), out.blocks)
        return self.drawn[key]


class _Cache:
    """Scored cells, one JSON line each, appended and fsynced as each is scored; a line a kill cut short is
    skipped when read back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  # held open for the whole search
        except OSError as exc:
            raise UsageError(
                f"cannot write beside the plan ({path}: {exc.strerror}); give a plan file elsewhere (--out)"
            ) from None
        for line in text.splitlines():
            try:
                record = json.loads(line)
                self.done[json.dumps(record["id"], sort_keys=True)] = record["scores"]
            except (ValueError, KeyError, TypeError):
                continue
        if text and not text.endswith("\n"):
            self.file.write("\n")  # the next line starts clean after a torn one

    def get(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        return self.done.get(json.dumps(identity, sort_keys=True))

    def put(self, identity: dict[str, Any], scores: dict[str, Any]) -> None:
        self.file.write(json.dumps({"id": identity, "scores": scores}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done[json.dumps(identity, sort_keys=True)] = scores

    def close(self, *, remove: bool) -> None:
        self.file.close()
        if remove:
            self.path.unlink(missing_ok=True)


def _reference(pipe: Pipeline, config: PlanConfig) -> ImageSet:
    """The model's training data (train split), or `config.ref`."""
    data = pipe.config.data
    ref = config.ref
    if ref is None:
        if data.name == "image_folder" and data.path:
            ref = data.path
        elif data.name == "fashion_mnist":
            ref = "fashion_mnist"
        else:
            raise UsageError(f"no reference images for data.name {data.name!r}: give the reference (--ref DIR)")
    data_dir = config.data_dir or (data.path if data.name == "fashion_mnist" else None)
    return load_reference(ref, split="train", data_dir=data_dir, limit=config.ref_n, seed=config.seed)


def _sha(extractor: Extractor) -> str:
    return extractor.cnn.sha256 if extractor.cnn is not None else sha256_file(extractor.weights)


def _scored_cells(cells: int, config: PlanConfig) -> int:
    """How many scores a search makes over all rungs when rung 0 has `cells` (for the progress bar)."""
    total = 0
    for _ in range(config.rungs):
        total += cells
        cells = math.ceil(cells / config.reduction)
        if cells == 1:
            break
    return total


def _grid_record(config: PlanConfig) -> dict[str, Any]:
    grid = attrs.asdict(config.grid)
    return {**grid, **{k: getattr(config, k) for k in ("samples", "rungs", "reduction", "seed")}}


# The `fpdm plan` flag of each option that differs from its default, for the command a plan records.
FLAGS = {
    "samplers": "--sampler",
    "spacings": "--spacing",
    "iters": "--iters",
    "steps": "--steps",
    "allocators": "--allocator",
    "solvers": "--solver",
}


def _command(model: str, budgets: list[str], config: PlanConfig, out: str | Path | None) -> str:
    """The `fpdm plan` command that makes this plan again."""
    words = ["fpdm", "plan", model, *[w for b in budgets for w in ("--budget", b)]]
    options = {**attrs.asdict(config.grid, recurse=False), **attrs.asdict(config, recurse=False)}
    defaults = {**attrs.asdict(Grid(), recurse=False), **attrs.asdict(PlanConfig(), recurse=False)}
    for name, value in options.items():
        if name in ("grid", "device") or value == defaults[name]:
            continue
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        words += [w for item in value for w in (flag, str(item))] if isinstance(value, tuple) else [flag, str(value)]
    if out is not None:
        words += ["--out", str(out)]
    return shlex.join(words)
