"""What benchmarks/paper_claims.py measures: the budgets, the seeds and the sampling variants. Shared with its
report (_paper_claims_report.py), which reads the same grid back from the JSON."""

DIT_DEPTH = 6  # DiT-XS
BLOCKS_PER_STEP = 6  # FPDM: pre + post + ~4 iterations per step, as benchmarks/sampling.py
BUDGETS = (2, 5, 10, 20)  # DiT-step equivalents
SEEDS_AT_LOWEST = (0, 1, 2)
# name -> (denoiser, solver, allocator, reuse)
VARIANTS = {
    "FPDM plain (cold)": ("fpdm", "fixed_point", "uniform", "cold"),
    "FPDM + reuse": ("fpdm", "fixed_point", "uniform", "reuse"),
    "FPDM + reuse + increasing ramp": ("fpdm", "fixed_point", "increasing", "reuse"),
    "FPDM + reuse + decreasing ramp": ("fpdm", "fixed_point", "decreasing", "reuse"),
    "FPDM + reuse + Anderson": ("fpdm", "anderson", "uniform", "reuse"),
    "FPDM + reuse + adaptive allocation": ("fpdm", "fixed_point", "adaptive", "reuse"),
    "FPDM + extrapolate reuse": ("fpdm", "fixed_point", "uniform", "extrapolate"),
    "FPDM + reuse, 2x steps": ("fpdm", "fixed_point", "uniform", "reuse"),
    "DiT": ("dit", "fixed_point", "uniform", "cold"),
}
# FPDM's other lever under a budget: more steps with fewer iterations each. The official sampler spends half
# DiT's blocks per step (XL/2: 40 steps x (1 + 12 + 1) = 20 DiT steps x 28); here pre + 1 iteration + post.
STEP_BLOCKS = {"FPDM + reuse, 2x steps": 3}
ARCHS = {"fpdm": "FPDM-XS/4", "dit": "DiT-XS/4"}
