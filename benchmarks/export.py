"""Export benchmark: one denoising step in PyTorch eager against the exported ONNX graph in ONNX Runtime.

    python benchmarks/export.py [--checkpoint runs/demo] [--update-docs] [--repeats 50]

CPU (always): the Fashion-MNIST model of `make demo` at K = 3 and 26 unrolled iterations, batch 1 and 16,
PyTorch eager (fp32, no_grad, the denoiser with its solver at tol 0) against ORT CPU (fp32 graph) on the same
inputs. CUDA (when present): FPDM-XL/2 at batch 64 (random weights; speed does not depend on them), K = 3 and
26: torch eager bf16 autocast, torch.compile bf16, ORT CUDA fp16 with IO binding, with and without CUDA
graphs. Every time is the median over `--repeats` calls after warm-up, the compared backends alternating
in blocks of 10 calls. Writes benchmarks/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _report import RESULTS, ROOT, publish
from fpdm.build import load_denoiser
from fpdm.export.exporter import OnnxExporter
from fpdm.export.onnx import example_inputs
from fpdm.export.ort import OrtDenoiser, OrtSession
from fpdm.io.checkpoint import load_checkpoint
from fpdm.registry import default_registry


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    return paired_median_ms([fn], repeats, sync)[0]


def paired_median_ms(
    fns: list[Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None, block: int = 10
) -> list[float]:
    """Median ms of each function over `repeats` calls, timed in alternating blocks of `block` calls, so that a
    change in the machine's load or clock during the run falls on all of them alike. Blocks rather than single
    calls: ORT's threads spin for a while after a run and would slow a torch call that follows at once."""
    for fn in fns:
        for _ in range(3):
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeats:
        for fn, seen in zip(fns, times):
            for _ in range(min(block, repeats - len(seen))):
                start = time.perf_counter()
                fn()
                sync()
                seen.append(time.perf_counter() - start)
    return [1e3 * statistics.median(seen) for seen in times]


def export_step(
    model: torch.nn.Module, solver_name: str, iters: int, out: Path, *, options: dict, fp16: bool = False
) -> None:
    """Export without a checkpoint (random weights): the metadata carries the factory options the ORT side reads."""
    registry = default_registry()
    OnnxExporter(iters=iters, fp16=fp16, verify=False).export(
        model,
        solver=registry.create("solver", solver_name),
        solver_info={"name": solver_name, "options": {}},
        config={},
        spec={"denoiser": "fpdm", "options": options},
        source={"benchmark": True},
        out=out,
    )


def cpu_rows(checkpoint: str, repeats: int, workdir: Path) -> list[dict]:
    registry = default_registry()
    model = load_denoiser(load_checkpoint(checkpoint), registry=registry)
    solver = registry.create("solver", "fixed_point")
    rows = []
    for k in (3, 26):
        path = workdir / f"k{k}.onnx"
        ckpt = load_checkpoint(checkpoint)
        OnnxExporter(iters=k).export(
            model,
            solver=solver,
            solver_info={"name": "fixed_point", "options": {}},
            config=ckpt.config,
            spec=ckpt.spec,
            source={},
            out=path,
        )
        ort_model = OrtDenoiser(OrtSession(path, provider="cpu"))
        for batch in (1, 16):
            x = example_inputs(model, batch)
            z0 = x["z0"]

            def eager() -> object:
                with torch.no_grad():
                    return model(x["x_t"], x["t"], x["y"], z0=z0, iters=k, solver=solver)

            def ort() -> object:
                return ort_model(x["x_t"], x["t"], x["y"], z0=z0, iters=k)

            t_eager, t_ort = paired_median_ms([eager, ort], repeats)
            rows.append(
                {
                    "device": "cpu",
                    "model": "FPDM-XS/4 (demo)",
                    "iters": k,
                    "batch": batch,
                    "torch_eager_fp32_ms": t_eager,
                    "ort_cpu_fp32_ms": t_ort,
                    "speedup": t_eager / t_ort,
                }
            )
            print(rows[-1], flush=True)
    return rows


def cuda_rows(repeats: int, workdir: Path) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    registry = default_registry()
    options = {
        "input_size": 32,
        "in_channels": 4,
        "patch_size": 2,
        "hidden_size": 1152,
        "num_heads": 16,
        "num_classes": 1000,
        "learn_sigma": True,
    }
    model = registry.create("denoiser", "fpdm", **options).eval()
    solver = registry.create("solver", "fixed_point")
    sync = torch.cuda.synchronize
    rows = []
    for k in (3, 26):
        x = {name: t.cuda() for name, t in example_inputs(model, 64).items()}
        cuda_model = model.cuda()

        def eager() -> object:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return cuda_model(x["x_t"], x["t"], x["y"], z0=x["z0"], iters=k, solver=solver)

        row = {
            "device": torch.cuda.get_device_name(),
            "model": "FPDM-XL/2",
            "iters": k,
            "batch": 64,
            "torch_eager_bf16_ms": median_ms(eager, repeats, sync),
        }
        compiled = torch.compile(cuda_model)

        def compiled_call() -> object:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(x["x_t"], x["t"], x["y"], z0=x["z0"], iters=k, solver=solver)

        row["torch_compile_bf16_ms"] = median_ms(compiled_call, repeats, sync)
        path = workdir / f"xl-k{k}-fp16.onnx"
        export_step(model.cpu(), "fixed_point", k, path, options=options, fp16=True)
        for graphs in (False, True):
            try:
                ort_model = OrtDenoiser(OrtSession(path, provider="cuda", cuda_graph=graphs))
                row[f"ort_cuda_fp16{'_graphs' if graphs else ''}_ms"] = median_ms(
                    lambda: ort_model(x["x_t"], x["t"], x["y"], z0=x["z0"], iters=k), repeats, sync
                )
            except Exception as exc:  # a provider that does not load is a result to report, not a crash
                row[f"ort_cuda_fp16{'_graphs' if graphs else ''}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        best = min(v for key, v in row.items() if key.startswith("ort_cuda") and key.endswith("_ms"))
        row["ort_vs_compile"] = best / row["torch_compile_bf16_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def table(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; torch {results['torch']}, onnxruntime {results['onnxruntime']}. "
        f"Command: `python benchmarks/export.py`. Median ms per denoising step.",
        "",
        "| device | model | K | batch | torch eager | ONNX Runtime | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["cpu"]:
        lines.append(
            f"| CPU | {r['model']} | {r['iters']} | {r['batch']} | {r['torch_eager_fp32_ms']:.2f} (fp32) "
            f"| {r['ort_cpu_fp32_ms']:.2f} (fp32) | {r['speedup']:.2f}x |"
        )
    for r in results["cuda"]:
        ms, key = min((v, k) for k, v in r.items() if k.startswith("ort_cuda") and k.endswith("_ms"))
        graphs = ", CUDA graphs" if "graphs" in key else ""
        lines.append(
            f"| {r['device']} | {r['model']} | {r['iters']} | {r['batch']} | {r['torch_eager_bf16_ms']:.1f} "
            f"(bf16), compile {r['torch_compile_bf16_ms']:.1f} | {ms:.1f} (fp16{graphs}) "
            f"| {r['ort_vs_compile']:.2f}x of compile |"
        )
    if not results["cuda"]:
        lines.append("")
        lines.append(
            "No GPU on the machine that produced this table: the CUDA rows (FPDM-XL/2, batch 64) were not measured."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--update-docs", "--update-readme", action="store_true", help="refresh docs/benchmarks.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": cpu_rows(args.checkpoint, args.repeats, Path(tmp)),
            "cuda": cuda_rows(args.repeats, Path(tmp)),
        }
    text = table(results)
    publish(args.out, "export", results, text, doc="export" if args.update_docs else None)


if __name__ == "__main__":
    main()
