"""Latency, memory and size of every backend and ncnn precision variant; the pick within a parity budget."""

# timing: statistics, the worker process    variants: recipe + runtime precision + backend
# facts: machine, parameters, MACs, sizes   records: typed results, bench.json
# select: the budget's pick                 orchestrate: bench_model
# auto: --precision auto                    render: table, summary, Markdown

from .auto import choose_variant
from .facts import count_macs, count_parameters, machine_info
from .orchestrate import bench_model
from .records import BenchOptions, BenchReport, BenchRow, Selection
from .render import HEADERS, bench_markdown, render_bench, summary_lines, table_rows
from .select import select_all, select_variant
from .timing import SPREAD_WIDE, latency_stats
from .variants import VARIANT_NAMES, VARIANTS, Variant, get_variant, variant_run_options

__all__ = [
    "HEADERS",
    "SPREAD_WIDE",
    "VARIANTS",
    "VARIANT_NAMES",
    "BenchOptions",
    "BenchReport",
    "BenchRow",
    "Selection",
    "Variant",
    "bench_markdown",
    "bench_model",
    "choose_variant",
    "count_macs",
    "count_parameters",
    "get_variant",
    "latency_stats",
    "machine_info",
    "render_bench",
    "select_all",
    "select_variant",
    "summary_lines",
    "table_rows",
    "variant_run_options",
]
