"""ONNX Runtime as a sampling backend: the exported step behind the Denoiser call, so `fpdm.diffusion.sampling`
runs the same samplers, model evaluation and reuse policies on it; and the exported whole loop as one batch
sampler for `fpdm.diffusion.sampling.generate_batches`.

Providers are explicit. CUDA runs with IO binding on torch's device buffers (and, optionally, CUDA graphs over
fixed-size buffers); CPU feeds numpy. ONNX Runtime falls back to CPU silently when the CUDA provider cannot
load, so the session's real provider is read back and reported, and an explicit `cuda` request that did not
get it is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpdm.diffusion.sampling import SampleResult, StepStats, step_noise
from fpdm.errors import UsageError
from fpdm.export.onnx import read_metadata
from fpdm.interfaces import DenoiserOutput, SolverStats

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NUMPY = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16}
TORCH = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(float16)": torch.float16}


class OrtSession:
    """An InferenceSession on the provider asked for ("auto": CUDA when it loads, else CPU)."""

    def __init__(
        self, path: str | Path, *, provider: str = "auto", cuda_graph: bool = False, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        if provider not in ("auto", *PROVIDERS):
            raise UsageError(f"unknown provider {provider!r}; use auto, cuda or cpu")
        if cuda_graph and provider == "cpu":
            raise UsageError("--cuda-graph needs the CUDA provider")
        self.meta = read_metadata(path)
        cuda_available = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
        wants_cuda = provider == "cuda" or (provider == "auto" and cuda_available)
        providers: list[Any] = ["CPUExecutionProvider"]
        if wants_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's own warnings are for its developers; the provider is reported
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise UsageError(
                "the CUDA provider did not load (onnxruntime-gpu with CUDA 13 / cuDNN 9 needed); use --provider cpu"
            )
        self.cuda = self.provider == "CUDAExecutionProvider"
        self.cuda_graph = cuda_graph and self.cuda
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        # What the file declares: fixed axes are ints, the batch axis a name; the dtype is the one fed (a format
        # 1 step graph takes t as int64, later ones as float32).
        self.input_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        self.input_dtypes = {i.name: TORCH[i.type] for i in self.session.get_inputs() if i.type in TORCH}
        self._buffers: dict[str, Tensor] = {}

    def run(self, feeds: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> list[Tensor]:
        """Run on torch tensors, each cast to the dtype the graph declares for it; returns torch tensors (on the
        CUDA device for the CUDA provider). `shapes` gives each output's shape, which IO binding needs up front."""
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}  # inputs the exporter kept
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise UsageError(f"the ONNX graph needs inputs {sorted(missing)} that were not given")
        for name, value in feeds.items():  # fixed axes must match; the batch axis is symbolic (a str)
            want = self.input_shapes[name]
            if len(want) != value.dim() or any(isinstance(w, int) and w != g for w, g in zip(want, value.shape)):
                raise UsageError(f"input {name} has shape {tuple(value.shape)}; the graph expects {tuple(want)}")
        feeds = {k: v.to(self.input_dtypes.get(k, v.dtype)) for k, v in feeds.items()}
        if not self.cuda:
            got = self.session.run(self.outputs, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in got]
        return self._run_bound(feeds, shapes)

    def _run_bound(self, feeds: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> list[Tensor]:
        device = torch.device("cuda", torch.cuda.current_device())
        binding = self.session.io_binding()
        for name, value in feeds.items():
            value = self._buffer(name, value.to(device).contiguous())
            binding.bind_input(name, "cuda", device.index, NUMPY[value.dtype], list(value.shape), value.data_ptr())
        outs = []
        for name in self.outputs:
            out = self._buffer(f"out:{name}", torch.empty(shapes[name], dtype=torch.float32, device=device), copy=False)
            binding.bind_output(name, "cuda", device.index, np.float32, list(out.shape), out.data_ptr())
            outs.append(out)
        torch.cuda.synchronize(device)  # inputs written by torch's stream before ORT reads them
        self.session.run_with_iobinding(binding)
        return [o.clone() if self.cuda_graph else o for o in outs]

    def _buffer(self, name: str, value: Tensor, *, copy: bool = True) -> Tensor:
        """CUDA graphs replay fixed addresses: keep one buffer per name and copy into it."""
        if not self.cuda_graph:
            return value
        held = self._buffers.get(name)
        if held is None:
            self._buffers[name] = held = value.clone()
        elif held.shape != value.shape:
            raise UsageError(
                f"--cuda-graph replays one batch size: {name} changed from {tuple(held.shape)} to "
                f"{tuple(value.shape)}; make --n a multiple of --batch-size"
            )
        elif copy:
            held.copy_(value)
        return held


class _ModelFacts:
    """What the sampler asks of a denoiser, read from the export's metadata instead of a module.

    `fixed_point` is the flag `fpdm.interfaces.is_fixed_point` reads for stand-ins that are not modules: an
    exported FPDM step spends its K iterations per call (and cannot be re-solved: no `prepare`/`finish`)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        options = meta["spec"]["options"]
        self.meta = meta
        self.in_channels, self.input_size = options["in_channels"], options["input_size"]
        self.num_classes, self.learn_sigma = options["num_classes"], options["learn_sigma"]
        self.patch_size, self.hidden_size = options["patch_size"], options["hidden_size"]
        self.out_channels = 2 * self.in_channels if self.learn_sigma else self.in_channels
        self.fixed_point, self.base_blocks = bool(meta["fixed_point"]), int(meta["base_blocks"])

    def blocks_per_call(self, iters: int) -> int:
        return self.base_blocks + (iters if self.fixed_point else 0)

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


class OrtDenoiser(_ModelFacts):
    """An exported step graph with the Denoiser call signature. It runs exactly the K iterations it was
    exported with: a plan asking for another count, a tolerance or per-sample caps is refused."""

    def __init__(self, session: OrtSession) -> None:
        super().__init__(session.meta)
        if session.meta.get("kind") != "step":
            raise UsageError("this .onnx holds a whole sampling loop, not a step; it runs through `OrtLoop`")
        self.session, self.iters = session, int(session.meta["iters"])
        self.integer_t = session.input_dtypes.get("t") == torch.int64  # format 1

    def to(self, device: Any) -> OrtDenoiser:  # the sampler moves models; the session's device is fixed
        return self

    def eval(self) -> OrtDenoiser:
        return self

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None,
        *,
        z0: Tensor | None = None,
        iters: int | Tensor = 0,
        solver: Any = None,
        tol: float = 0.0,
        grad_iters: int = 0,
    ) -> DenoiserOutput:
        b = x.shape[0]
        if self.fixed_point and (isinstance(iters, Tensor) or iters != self.iters or tol > 0 or grad_iters):
            raise UsageError(
                f"the ONNX graph runs exactly {self.iters} iterations per step; asked for {iters}"
                f"{' with a tolerance' if tol > 0 else ''}: export another --iters or use the "
                "PyTorch backend"
            )
        if self.integer_t and t.is_floating_point() and bool((t != t.round()).any()):
            raise UsageError(
                f"this .onnx (fpdm ONNX format {self.meta['format_version']}) takes integer timesteps and the "
                "sampling asks for fractional ones (karras spacing): export the model again with this fpdm"
            )
        feeds = {"x_t": x.float(), "t": t}  # t (B,) as the graph declares it: float32, int64 in format 1
        if y is not None:
            feeds["y"] = y.long()
        shapes: dict[str, tuple[int, ...]] = {"pred": (b, self.out_channels, self.input_size, self.input_size)}
        if self.fixed_point:
            cold = z0 is None
            feeds["z0"] = torch.zeros(b, self.tokens, self.hidden_size) if z0 is None else z0.float()
            feeds["use_z0"] = torch.full((b,), 0.0 if cold else 1.0)
            shapes.update(z=(b, self.tokens, self.hidden_size), residual=(b,))
        outs = dict(zip(self.session.outputs, self.session.run(feeds, shapes)))
        blocks = torch.full((b,), self.blocks_per_call(self.iters), dtype=torch.int64)
        if not self.fixed_point:
            return DenoiserOutput(outs["pred"], None, None, blocks)
        residual = outs["residual"].float().cpu()
        stats = SolverStats(torch.full((b,), self.iters, dtype=torch.int64), residual, residual == 0.0)
        return DenoiserOutput(outs["pred"], outs["z"], stats, blocks)


class OrtLoop(_ModelFacts):
    """An exported whole loop: one ONNX call per batch, fed the same draws `fpdm.diffusion.sampling.sample` makes.

    Its plan is per model evaluation (a sampler may evaluate more than once per step): `iterations`, `levels`
    (respaced indices) and `timesteps` (model timesteps), in call order. Format 1 files recorded neither levels
    nor draws: one evaluation per step, noisiest first, a noise row per step and a draw after every step but
    the last."""

    def __init__(self, session: OrtSession) -> None:
        super().__init__(session.meta)
        meta = session.meta
        if meta.get("kind") != "loop":
            raise UsageError("this .onnx holds one denoising step, not a whole loop")
        self.session = session
        self.iterations: list[int] = list(meta["iterations"])
        steps = int(meta["steps"])
        self.levels: list[int] = list(meta.get("levels", range(steps - 1, -1, -1)))
        self.timesteps: list[float] = [meta["timesteps"][i] for i in self.levels]
        self.draws = int(meta.get("draws", steps - 1))
        # Rows of the noise input: `draws` since format 2; format 1 had one per step, the last one never read.
        self.rows = int(session.input_shapes["noise"][0]) if "noise" in session.inputs else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def __call__(
        self, generators: list[torch.Generator], labels: Tensor | None, x_T: Tensor | None = None
    ) -> SampleResult:
        """One batch (a `BatchSampler`): the sampling choices are fixed inside the graph. The draws are the ones
        `sample` makes: x_T first (replaced by the x_T given, if any), then the sampler's noise draws in order."""
        evaluations, b, shape = len(self.iterations), len(generators), self.shape
        drawn = step_noise(generators, shape, torch.device("cpu"))  # (B, C, H, W)
        if x_T is not None and tuple(x_T.shape) != tuple(drawn.shape):
            raise UsageError(f"x_T must have shape {tuple(drawn.shape)}, got {tuple(x_T.shape)}")
        feeds = {"x_T": drawn if x_T is None else x_T.float().cpu()}
        if labels is not None:
            feeds["y"] = labels.long()
        if self.rows:
            real = min(self.draws, self.rows)
            rows = [step_noise(generators, shape, torch.device("cpu")) for _ in range(real)]
            rows += [torch.zeros(b, *shape)] * (self.rows - real)
            feeds["noise"] = torch.stack(rows)  # (D, B, C, H, W)
        images, residual = self.session.run(feeds, {"images": (b, *shape), "residual": (evaluations, b)})
        residual = residual.float().cpu()  # (E, B)
        history = [self._evaluation(k, residual[k]) for k in range(evaluations)]
        blocks = torch.full((b,), sum(self.blocks_per_call(k) for k in self.iterations), dtype=torch.int64)
        return SampleResult(images.cpu(), history, blocks)

    def _evaluation(self, k: int, residual: Tensor) -> StepStats:
        cap, timestep = self.iterations[k], float(self.timesteps[k])
        if not self.fixed_point:
            return StepStats(k, timestep, 0, 0.0, 0, float("nan"), float("nan"), float(self.base_blocks))
        return StepStats(
            k,
            timestep,
            cap,
            float(cap),
            cap,
            residual.double().nanmean().item(),
            residual.double().nan_to_num(nan=0.0).max().item(),
            float(self.blocks_per_call(cap)),
        )


def session_summary(session: OrtSession) -> str:
    meta = session.meta
    what = f"K={meta['iters']}" if meta["kind"] == "step" else f"{meta['steps']} steps"
    return (
        f"onnxruntime {session.provider}{' + CUDA graphs' if session.cuda_graph else ''} ({meta['kind']}, {what}, "
        f"{meta['precision']})"
    )
