"""Every backend on the same inputs: outputs by the spec's names and what each backend was and how fast,
each backend's outputs reused from the stage cache when the files, inputs and tools are the same."""

from __future__ import annotations

from .backends import REFERENCE, Artifacts, RunnerConfig, create_runner, get_backend
from .backends.base import by_spec_name
from .cache import StageCache, digest, file_digest
from .errors import BackendError
from .model import build_model
from .progress import StageTimer
from .results import BackendResult, InputItem
from .spec import ModelSpec
from .versions import versions


def infer_all(
    spec: ModelSpec, art: Artifacts, opts, backends: list[str], items: list[InputItem],
    timer: StageTimer, reference: str = REFERENCE, cache: StageCache | None = None,
) -> tuple[dict[str, list[dict]], dict[str, BackendResult]]:  # fmt: skip
    """Run every backend on the same inputs: ({backend: [outputs by spec name, one per input]},
    {backend: what it was and how fast}). A backend other than the reference that fails (a crash,
    native or not) is recorded with its error and the others still run."""
    config = RunnerConfig(
        tuple([spec.input_name]), tuple(spec.output_names), opts.ncnn_precision, opts.threads
    )
    outputs: dict[str, list[dict]] = {}
    results: dict[str, BackendResult] = {}
    cache = cache or StageCache(None)
    for name in backends:
        key = _infer_key(name, art, opts, items) if cache.on and get_backend(name).cacheable else None
        got = cache.load_outputs(f"infer:{name}", key) if key else None
        if got is not None:
            outputs[name], results[name] = got[0], BackendResult(name, **got[1])
            continue
        try:
            if "model" in get_backend(name).needs and art.model is None:  # files came from the cache
                with timer.stage("load"):
                    art.model = build_model(spec, opts.weights)
            with timer.stage(f"infer:{name}"):
                outputs[name], results[name] = _infer_one(name, spec, art, opts, config, items)
            if key:
                cache.store_outputs(f"infer:{name}", key, outputs[name], _cacheable(results[name]))
        except BackendError as exc:
            if name == reference:
                raise
            results[name] = BackendResult(name, error=str(exc))
    return outputs, results


def _infer_key(name: str, art: Artifacts, opts, items: list[InputItem]) -> str:
    """What decides a backend's outputs: the files it runs (by content), the inputs (tensors and photos),
    its precision and threads, and the versions of everything that computes them."""
    from .targets.build import sources_hash

    files = (
        [art.ncnn_param, art.ncnn_bin, art.onnx, art.torchscript]
        if get_backend(name).family != "torch"
        else [art.torchscript, opts.weights]
    )
    runner = sources_hash() if get_backend(name).runner_sources else None
    return digest(
        "infer", name, [file_digest(f) for f in files],
        [(i.label, i.feed, file_digest(i.image)) for i in items], opts.ncnn_precision, opts.threads,
        (art.meta or {}).get("ncnn_options"), runner, versions(),
    )  # fmt: skip


def _cacheable(result: BackendResult) -> dict:
    """The fields of a BackendResult that come back with cached outputs; its latency is marked as from
    the run that made them."""
    method = f"{result.latency_method} (cached run)" if result.latency_method else None
    return {"device": result.device, "latency_ms_median": result.latency_ms_median, "latency_method": method,
            "precision": result.precision, "extra": dict(result.extra, cached=True)}  # fmt: skip


def _infer_one(
    name: str, spec: ModelSpec, art: Artifacts, opts, config: RunnerConfig, items: list[InputItem]
) -> tuple[list[dict], BackendResult]:
    with create_runner(name, art, config) as runner:
        outs, firsts = [], []
        for item in items:
            outs.append(by_spec_name(runner.infer_item(item), spec.output_names))
            if item.at_spec_shape:
                firsts.append(runner.last_latency_s)
        first = next(i for i in items if i.at_spec_shape)
        seconds, method = runner.warm_latency(first.feed, firsts)
        takes = opts.ncnn_precision if get_backend(name).takes_precision else None
        return outs, BackendResult(
            name, device=runner.device(), latency_ms_median=round(seconds * 1e3, 3),
            latency_method=method, precision=takes, extra=runner.extra(),
        )  # fmt: skip
