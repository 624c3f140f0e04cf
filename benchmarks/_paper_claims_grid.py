"""What benchmarks/paper_claims.py measures: the budgets, the seeds and the sampling variants. Shared with its
report (_paper_claims_report.py), which reads the same grid back from the JSON."""

DIT_DEPTH = 6  # DiT-XS
BLOCKS_PER_STEP = 6  # FPDM: pre + post + ~4 iterations per step, as benchmarks/sampling.py
BUDGETS = (2, 5, 10, 20)  # DiT-step equivalents
SEEDS_AT_LOWEST = (0, 1, 2)
# name -> (denoiser, solver, allocator, reuse, sampler). The paper's techniques are DDIM rows; the multistep rows
# are fpdm's additions (issue 15), every model evaluation warm-started by reuse.
VARIANTS = {
    "FPDM plain (cold)": ("fpdm", "fixed_point", "uniform", "cold", "ddim"),
    "FPDM + reuse": ("fpdm", "fixed_point", "uniform", "reuse", "ddim"),
    "FPDM + reuse + increasing ramp": ("fpdm", "fixed_point", "increasing", "reuse", "ddim"),
    "FPDM + reuse + decreasing ramp": ("fpdm", "fixed_point", "decreasing", "reuse", "ddim"),
    "FPDM + reuse + Anderson": ("fpdm", "anderson", "uniform", "reuse", "ddim"),
    "FPDM + reuse + adaptive allocation": ("fpdm", "fixed_point", "adaptive", "reuse", "ddim"),
    "FPDM + extrapolate reuse": ("fpdm", "fixed_point", "uniform", "extrapolate", "ddim"),
    "FPDM + reuse, 2x steps": ("fpdm", "fixed_point", "uniform", "reuse", "ddim"),
    "DiT": ("dit", "fixed_point", "uniform", "cold", "ddim"),
    "FPDM + reuse + dpmpp_3m": ("fpdm", "fixed_point", "uniform", "reuse", "dpmpp_3m"),
    "FPDM + reuse + unipc": ("fpdm", "fixed_point", "uniform", "reuse", "unipc"),
    "FPDM + reuse + dpmpp_3m, 2x steps": ("fpdm", "fixed_point", "uniform", "reuse", "dpmpp_3m"),
    "FPDM + reuse + unipc, 2x steps": ("fpdm", "fixed_point", "uniform", "reuse", "unipc"),
    "DiT + dpmpp_3m": ("dit", "fixed_point", "uniform", "cold", "dpmpp_3m"),
    "DiT + unipc": ("dit", "fixed_point", "uniform", "cold", "unipc"),
}
# FPDM's other lever under a budget: more steps with fewer iterations each. The official sampler spends half
# DiT's blocks per step (XL/2: 40 steps x (1 + 12 + 1) = 20 DiT steps x 28); here pre + 1 iteration + post.
STEP_BLOCKS = {
    "FPDM + reuse, 2x steps": 3,
    "FPDM + reuse + dpmpp_3m, 2x steps": 3,
    "FPDM + reuse + unipc, 2x steps": 3,
}
ARCHS = {"fpdm": "FPDM-XS/4", "dit": "DiT-XS/4"}
