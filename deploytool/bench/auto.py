"""--precision auto: bench the ncnn variants, pick the fastest within the budget, set `run` up for it."""

from __future__ import annotations

from .. import judge
from ..errors import SpecError
from ..options import RunOptions
from ..pipeline import run
from ..registry import get_backend, parse_backends
from ..results import RunReport
from ..spec import ModelSpec
from .orchestrate import bench_model
from .records import BenchOptions
from .select import select_variant
from .variants import VARIANT_BACKENDS, variant_run_options

AUTO_RUNS = 10
AUTO_WARMUP = 2


def choose_variant(spec: ModelSpec, opts: RunOptions) -> tuple[RunOptions, str]:
    """Bench the variants at opts.threads (into opts.out/bench, on the run's images and weights), pick
    the fastest within opts.budget, and return the run's options for it with the reason. A budget
    nothing fits is a ParityError naming each variant's failure; a bad budget a SpecError."""
    if opts.budget is None:
        raise SpecError('--precision auto needs --budget, e.g. --budget "top1=1.0,rel=1e-2"')
    budget = judge.parse_budget(opts.budget)  # before any work
    run_backends = parse_backends(opts.backends)
    if not set(run_backends) & set(VARIANT_BACKENDS):
        which = " or ".join(VARIANT_BACKENDS)
        raise SpecError(f"--precision auto picks among ncnn variants; include {which} in --backends")
    backends = None  # every bench backend that can run here
    if opts.backends is not None:  # only the run's own backends that bench times
        backends = ",".join(b for b in run_backends if get_backend(b).bench)
    report = bench_model(
        spec,
        BenchOptions(
            out=opts.out / "bench",
            runs=AUTO_RUNS,
            warmup=AUTO_WARMUP,
            threads=(opts.threads,),
            backends=backends,
            images=opts.images,
            weights=opts.weights,
            budget=budget.text,
            recipe=opts.recipe,  # the converter; each variant sets its own weights
        ),
    )
    pick = select_variant(report.rows, budget, opts.threads, spec.name)
    return variant_run_options(pick.variant, opts), pick.reason


def run_auto(spec: ModelSpec, opts: RunOptions) -> RunReport:
    """`run --precision auto`: choose the variant (choose_variant), then run the pipeline with it; the
    report's notes say which variant and why."""
    picked, reason = choose_variant(spec, opts)
    report = run(spec, picked)
    report.notes.insert(0, f"precision auto: {reason}")
    return report
