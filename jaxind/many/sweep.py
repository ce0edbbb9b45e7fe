"""Many models at once: ``python -m jaxind.sweep --config=sweep.yaml --output=DIR`` (its command line
is :mod:`jaxind.cli.sweep`).

    python -m jaxind.sweep --config=configs/llama2_zoo.yaml --output=runs/zoo [--workers=4]
    python -m jaxind.sweep --config=sweep.yaml --output=DIR --shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    python -m jaxind.sweep --config=sweep.yaml --output=DIR --report_only

Each model is converted once and fingerprinted once on the sweep's shared reference tokens
(:mod:`jaxind.many.modelstore`, cached by content under ``--cache_dir``); each pair is then tested from
the two stored models and their fingerprints: matmuls and LAPs, no forward pass for MATCH and
CSH (docs/DESIGN.md §5.10). Every pair's results JSON is written atomically to
``DIR/pairs/<a>__<b>.json``; a failing model or pair is recorded with its error and the sweep goes
on. A rerun (after a crash, a kill, Ctrl-C) skips every finished conversion, fingerprint and pair:
a pair is finished when its JSON exists and was made from the same model contents and settings.
``--workers=N`` runs N local processes; ``--shard=i/n`` runs every n-th pair from the i-th (a
SLURM array or several hosts sharing ``DIR`` and the cache), composing with resume. Every run ends
by writing ``DIR/summary.json`` and the report (:mod:`jaxind.many.provenance`) from what ``DIR`` holds.

Exit status: 0 when the sweep ran (whatever failed inside it; see ``summary.json``), 1 on bad
input (one ``error:`` line, before any model is loaded), 130 on Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jaxind.errors import JaxindError
from jaxind.io import caching
from jaxind.many.sweep_config import ModelEntry, SweepConfig
from jaxind.many.sweep_summary import EventLog, pair_name, read_json, read_pair

__all__ = [
    "DATA_TESTS",
    "Job",
    "check_tokenizer",
    "finish",
    "make_tokens",
    "model_job",
    "pair_finished",
    "pair_job",
    "pair_record",
    "parse_shard",
    "run_sweep",
    "settings_for",
    "shared_tokens",
]

DATA_TESTS = frozenset({"match", "csh"})  # the tests that read fingerprints
_written: list[str] = []


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None -> ``(0, 1)``.

    Raises:
      JaxindError: anything else.
    """
    if text is None:
        return 0, 1
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit() and 0 <= int(i) < int(n)):
        raise JaxindError(f"--shard={text} not understood: use i/n with 0 <= i < n, e.g. --shard=0/4")
    return int(i), int(n)


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker process needs for one model or one pair (picklable)."""

    config: SweepConfig
    output: str
    cache_root: str
    tokens: Any
    names: tuple[str, ...]  # one model name, or the pair's two
    states: tuple[dict[str, Any], ...] = ()  # for a pair: both models' states


# --- the reference tokens ---------------------------------------------------------------------------


def _configs(models: Sequence[ModelEntry]) -> dict[str, tuple[Any, Any]]:
    """``{name: (config, tokenizer spec)}`` of every model whose config can be read (no weights)."""
    from converters import sources

    out = {}
    for m in models:
        try:
            out[m.name] = sources.read_config(m.source)
        except JaxindError:
            continue  # the model's own task records why
    return out


def make_tokens(models: Sequence[ModelEntry], d: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Reference tokens for ``models`` from data settings ``d`` (a sweep file's ``data:``), and how
    they were made: random ids below ``d["vocab"]`` (default: the smallest vocabulary of the models),
    or text cut by the tokenizer of model ``d["tokenizer"]`` (default: the first with one).

    Raises:
      JaxindError: no model can be read, or text data without a tokenizer.
    """
    import numpy as np

    from jaxind.io import token_source
    from jaxind.io.tokenizer import load_tokenizer

    known = _configs(models)
    if not known and d["vocab"] is None:
        raise JaxindError("no model can be read, so no tokens can be made: check the model sources")
    vocab = d["vocab"] or min(cfg.vocab_size for cfg, _ in known.values())
    spec = token_source.DataSpec(d["kind"], d["path"], d["num_sequences"], d["seq_len"], d["seed"])
    info = {
        "data": {k: v for k, v in d.items() if k != "vocab"},
        "vocab": vocab,
        "tokenizer_model": None,
        "tokenizer": None,
    }
    if d["kind"] == "random":
        return token_source.make_tokens(spec, vocab, vocab), info
    ref = d["tokenizer"] or next((m.name for m in models if known.get(m.name, (0, None))[1]), None)
    if ref is None or ref not in known or known[ref][1] is None:
        raise JaxindError(
            f"{d['kind']} data needs a tokenizer and model {ref or '(none)'} has none: set data.tokenizer"
        )
    info.update(tokenizer_model=ref, tokenizer=known[ref][1])
    return np.asarray(token_source.make_tokens(spec, vocab, vocab, load_tokenizer(known[ref][1]))), info


def shared_tokens(config: SweepConfig, output: str) -> Any:
    """The reference tokens of the sweep in ``output``: made by the first run (under a lock, so
    shards agree) and read back by every later one.

    Raises:
      JaxindError: ``output`` holds a sweep made with other data settings.
    """
    import numpy as np

    from jaxind.io import disk_cache
    from jaxind.stats import fingerprint

    path = os.path.join(output, "tokens.npy")
    with disk_cache.lock(path):
        info = read_json(os.path.join(output, "sweep.json"))
        if info is not None and os.path.isfile(path):
            wanted = {k: v for k, v in config.data.items() if k != "vocab"}
            if info["data"] != wanted or (config.data["vocab"] not in (None, info["vocab"])):
                raise JaxindError(
                    f"{output} holds a sweep made with other data settings ({info['data']}): "
                    "use a new --output, or the data settings it was made with"
                )
            found = _read_tokens(path, info.get("token_hash"))
            if found is not None:
                return found
        tokens, info = make_tokens(config.models, config.data)
        np.save(path + ".tmp.npy", tokens)
        os.replace(path + ".tmp.npy", path)
        disk_cache.write_text(
            os.path.join(output, "sweep.json"), _dumps({**info, "token_hash": fingerprint.token_hash(tokens)})
        )
        return tokens


def _read_tokens(path: str, recorded: str | None) -> Any:
    """The sweep's reference tokens if ``path`` holds the ids whose hash ``sweep.json`` records; else
    None, after one warning (they are made again from the data settings)."""
    import numpy as np
    from absl import logging

    from jaxind.stats import fingerprint

    try:
        tokens = np.load(path, allow_pickle=False)
        if tokens.ndim == 2 and fingerprint.token_hash(tokens) == recorded:
            return tokens
        why = "its token ids differ from the hash sweep.json records"
    except (OSError, ValueError, EOFError) as e:
        why = f"{type(e).__name__}: {e}"
    logging.warning("%s is damaged (%s): making the reference tokens again", path, why)
    return None


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=1, default=str)


# --- one model ----------------------------------------------------------------------------------------


def _fingerprint_layers(config: SweepConfig, n_layers: int) -> tuple[int, ...]:
    """The layers a model's fingerprint covers: those the sweep's layer selection names, or all."""
    from jaxind.models import layer_selection

    chosen: set[int] = set(range(n_layers))
    if config.layers is not None:
        chosen = set(layer_selection.parse_layers(config.layers))
    elif config.layer_pairs is not None:
        chosen = {l for pair in layer_selection.parse_layer_pairs(config.layer_pairs) for l in pair}
    return tuple(sorted(l for l in chosen if l < n_layers))


def check_tokenizer(stored: Any, d: dict[str, Any], info: dict[str, Any]) -> None:
    """For text data: the model's tokenizer must give the reference tokenizer's ids (``info``, from
    :func:`make_tokens`) on all the text fed.

    Raises:
      JaxindError: it does not (naming the window or document and the first differing token).
    """
    from jaxind.io import token_source
    from jaxind.io.tokenizer import check_same_tokens, encode, load_tokenizer

    mine = stored.meta.get("tokenizer")
    if d["kind"] == "random" or mine is None or mine == info["tokenizer"]:
        return
    reference, own = load_tokenizer(info["tokenizer"]), load_tokenizer(mine)
    spec = token_source.DataSpec(d["kind"], d["path"], d["num_sequences"], d["seq_len"], d["seed"])
    try:
        if d["kind"] == "text":
            token_source.text_windows(spec, reference).check(reference, own)
        else:  # all the documents (data.make_tokens would align two tokenizers; a sweep shares one token array)
            texts = token_source.read_texts(spec)
            separate = getattr(reference, "eos_token_id", None) is not None and len(texts) > 1
            check_same_tokens(texts, encode(reference, texts), reference, own, separator=separate)
    except JaxindError as e:
        raise JaxindError(
            f"model {stored.name}'s tokenizer differs from model {info['tokenizer_model']}'s, which cut the text: {e}"
        ) from None


def model_job(job: Job) -> dict[str, Any]:
    """Converts (once) and fingerprints (once) one model; writes and returns its state."""
    from jaxind import testhooks
    from jaxind.io import disk_cache
    from jaxind.many import modelstore

    (name,) = job.names
    entry, events = job.config.model(name), EventLog(job.output)
    state: dict[str, Any] = {"name": name, "source": entry.source, "status": "error", "key": None, "fingerprint": None}
    start = time.perf_counter()
    try:
        stored, converted = modelstore.ensure(name, entry.source, job.config.dtype, job.cache_root)
        events.add("converted" if converted else "model_cached", name=name, key=stored.key)
        state.update(key=stored.key, summary=stored.summary(), tokenizer=stored.meta.get("tokenizer"))
        if entry.family and stored.config.family != entry.family:
            raise JaxindError(f"the sweep says family {entry.family}, the model's config says {stored.config.family}")
        if int(job.tokens.max()) >= stored.config.vocab_size:
            raise JaxindError(
                f"its vocabulary ({stored.config.vocab_size}) lacks the sweep's token ids up to {int(job.tokens.max())}"
            )
        check_tokenizer(stored, job.config.data, read_json(os.path.join(job.output, "sweep.json")))
        chosen = _fingerprint_layers(job.config, stored.config.n_layers)
        # (a mixture of experts has no fingerprint: its pairs run the expert pass, jaxind.stats.experts)
        if DATA_TESTS & set(job.config.tests) and stored.config.glu and not stored.config.moe and chosen:
            fp, computed = modelstore.ensure_fingerprint(
                stored, job.tokens, chosen, batch_size=job.config.batch_size, cache_root=job.cache_root,
                data_info=job.config.data,
            )  # fmt: skip
            events.add("fingerprinted" if computed else "fingerprint_cached", name=name, key=fp.key)
            state["fingerprint"] = fp.key
            testhooks.stop_at(f"fingerprinted:{name}")
        state.update(status="ok", error=None)
    except (JaxindError, Exception) as e:  # recorded; the sweep goes on
        state["error"] = str(e) if isinstance(e, JaxindError) else f"{type(e).__name__}: {e}"
        events.add("model_error", name=name, error=state["error"])
    state["seconds"] = time.perf_counter() - start
    disk_cache.write_text(os.path.join(job.output, "models", name + ".json"), _dumps(state))
    return state


# --- one pair ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _stored(name: str, source: str, key: str, dtype: str, cache_root: str) -> Any:
    """The stored model of a pair's model job, verified (a damaged entry is rebuilt under its lock).

    Raises:
      JaxindError: the source changed since its model job (another content key).
    """
    from jaxind.many import modelstore

    stored, _ = modelstore.ensure(name, source, dtype, cache_root)
    if stored.key != key:
        raise JaxindError(f"model {name} changed while the sweep ran (content key {stored.key}, not {key}): rerun")
    return stored


def _fingerprint(job: Job, state: dict[str, Any]) -> Any:
    """The fingerprint of a pair's model job, verified (a damaged one is computed again under its lock)."""
    from jaxind.many import modelstore

    if state["fingerprint"] is None:
        return None
    stored = _stored(state["name"], state["source"], state["key"], job.config.dtype, job.cache_root)
    chosen = _fingerprint_layers(job.config, stored.config.n_layers)
    fp, _ = modelstore.ensure_fingerprint(
        stored, job.tokens, chosen, batch_size=job.config.batch_size, cache_root=job.cache_root,
        data_info=job.config.data,
    )  # fmt: skip
    if fp.key != state["fingerprint"]:
        raise JaxindError(f"model {state['name']}'s fingerprint changed while the sweep ran: rerun")
    return fp


def settings_for(config: SweepConfig, output: str, a: str, b: str) -> Any:
    """The runner settings of one pair (its localized heatmap beside its JSON)."""
    from jaxind.io import token_source
    from jaxind.models import layer_selection
    from jaxind.pair import runner

    d = config.data
    return runner.Settings(
        tests=config.tests,
        data=token_source.DataSpec(d["kind"], d["path"], d["num_sequences"], d["seq_len"], d["seed"]),
        num_perms=config.num_perms,
        batch_size=config.batch_size,
        generalized_steps=config.generalized_steps,
        heatmap_path=os.path.join(output, "pairs", pair_name(a, b) + "_localized.png")
        if "localized" in config.tests
        else None,
        alpha=config.alpha,
        layers=None if config.layers is None else layer_selection.parse_layers(config.layers),
        layer_pairs=None if config.layer_pairs is None else layer_selection.parse_layer_pairs(config.layer_pairs),
    )


def pair_record(config: SweepConfig, states: tuple[dict[str, Any], ...], token_hash: str) -> dict[str, Any]:
    """What a finished pair's JSON records of its inputs (``sweep`` key): resume compares it."""
    return {
        "name_a": states[0]["name"],
        "name_b": states[1]["name"],
        "model_keys": [s["key"] for s in states],
        "fingerprints": [s["fingerprint"] for s in states],
        "token_hash": token_hash,
        "settings": config.work_settings(),
    }


def pair_job(job: Job) -> dict[str, Any]:
    """Tests one pair from the stored models and their fingerprints; writes its JSON (or its error)."""
    from jaxind import testhooks
    from jaxind.io import disk_cache
    from jaxind.many import modelstore
    from jaxind.stats import fingerprint, results

    a, b = job.names
    name, events = pair_name(a, b), EventLog(job.output)
    path = os.path.join(job.output, "pairs", name + ".json")
    error_path = os.path.join(job.output, "errors", name + ".json")
    start = time.perf_counter()
    try:
        fa, fb = (_fingerprint(job, s) for s in job.states)
        stored = [_stored(s["name"], s["source"], s["key"], job.config.dtype, job.cache_root) for s in job.states]
        models = [m.load() for m in stored]
        record = pair_record(job.config, job.states, fingerprint.token_hash(job.tokens))
        settings = settings_for(job.config, job.output, a, b)
        result = modelstore.run_stored_pair(models[0], models[1], settings, job.tokens, (fa, fb), sweep=record)
        document = result.to_json()
        results.write_json(path, document)
        if os.path.exists(error_path):
            os.unlink(error_path)
        seconds = time.perf_counter() - start
        events.add("pair", a=a, b=b, seconds=round(seconds, 3))
        testhooks.stop_at(f"pair_written:{name}")
        return {"a": a, "b": b, "status": "done", "seconds": seconds, "tests": document["tests"]}
    except (JaxindError, Exception) as e:  # recorded; the sweep goes on
        error = str(e) if isinstance(e, JaxindError) else f"{type(e).__name__}: {e}"
        disk_cache.write_text(error_path, _dumps({"a": a, "b": b, "error": error}))
        events.add("pair_error", a=a, b=b, error=error)
        return {"a": a, "b": b, "status": "error", "error": error, "seconds": time.perf_counter() - start}


def pair_finished(config: SweepConfig, output: str, states: tuple[dict[str, Any], ...], token_hash: str) -> bool:
    """Whether the pair's JSON exists, is whole and was made from these model contents and settings
    (a damaged one is computed again and replaced)."""
    result, _ = read_pair(output, pair_name(states[0]["name"], states[1]["name"]), config.tests)
    return result is not None and result.extra["sweep"] == pair_record(config, states, token_hash)


# --- running the jobs ------------------------------------------------------------------------------------


def _worker_init(environ: dict[str, str]) -> None:
    os.environ.update(environ)
    caching.enable_compilation_cache(caching.compilation_cache_dir())


def _run_jobs(
    fn: Callable[[Job], dict[str, Any]],
    jobs: list[Job],
    pool: concurrent.futures.Executor | None,
    describe: Callable[[dict[str, Any]], str],
    log: Callable[[str], None],
    desc: str,
) -> list[dict[str, Any]]:
    """Runs ``jobs`` in this process or on ``pool``, one log line per finished job and a progress
    bar (with ETA) on a terminal; returns their results in completion order."""
    from jaxind import progress

    out: list[dict[str, Any]] = []
    start = time.perf_counter()
    with progress.bar(total=len(jobs), desc=desc, unit=desc.split()[0]) as bar:
        done: Iterable[Any]
        if pool is None:
            done = (fn(job) for job in jobs)
        else:
            done = (f.result() for f in concurrent.futures.as_completed([pool.submit(fn, job) for job in jobs]))
        for result in done:
            out.append(result)
            bar.update(1)
            eta = (time.perf_counter() - start) / len(out) * (len(jobs) - len(out))
            log(f"[{len(out)}/{len(jobs)} {desc}, ETA {eta:.0f} s] {describe(result)}")
    return out


def _describe_model(state: dict[str, Any]) -> str:
    if state["status"] != "ok":
        return f"model {state['name']}: error: {state['error']}"
    return f"model {state['name']}: ready ({state['seconds']:.1f} s)"


def _describe_pair(result: dict[str, Any]) -> str:
    if result["status"] != "done":
        return f"pair {result['a']} vs {result['b']}: error: {result['error']}"
    parts = []
    for test, record in result["tests"].items():
        log10 = record.get("log10_pvalue")
        parts.append(f"{test} {'-' if log10 is None else f'10^{log10:.1f}'}")
    return f"pair {result['a']} vs {result['b']}: {', '.join(parts)} ({result['seconds']:.1f} s)"


def run_sweep(
    config: SweepConfig,
    output: str,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs (or resumes) the sweep's share ``shard`` of pairs into ``output``; returns the summary.

    Raises:
      JaxindError: ``output`` holds a sweep with other data settings, or no tokens can be made.
    """
    from jaxind.io import disk_cache
    from jaxind.stats import fingerprint

    cache_root = disk_cache.root(config.cache_dir)
    disk_cache.check_writable(cache_root, "the jaxind cache")
    for sub in ("pairs", "models", "errors", "log"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    EventLog(output).add("run", shard=f"{shard[0]}/{shard[1]}", workers=workers, argv=sys.argv[1:])
    mine = [pair for k, pair in enumerate(config.pairs) if k % shard[1] == shard[0]]
    tokens = shared_tokens(config, output)
    token_hash = fingerprint.token_hash(tokens)
    names = tuple(dict.fromkeys(n for pair in mine for n in pair))
    pool = None
    if workers > 1:
        environ = {"JAXIND_CACHE": cache_root, caching.COMPILATION_CACHE_ENV: caching.compilation_cache_dir() or "off"}
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(environ,)
        )
    try:
        jobs = [Job(config, output, cache_root, tokens, (n,)) for n in names]
        states = {s["name"]: s for s in _run_jobs(model_job, jobs, pool, _describe_model, log, "models")}
        pair_jobs, events = [], EventLog(output)
        for a, b in mine:
            pair_states = (states[a], states[b])
            if any(s["status"] != "ok" for s in pair_states):
                failed = [s["name"] for s in pair_states if s["status"] != "ok"]
                message = f"model {' and '.join(failed)} failed: see models/{failed[0]}.json"
                disk_cache.write_text(
                    os.path.join(output, "errors", pair_name(a, b) + ".json"), _dumps({"error": message})
                )
            elif pair_finished(config, output, pair_states, token_hash):
                events.add("pair_skipped", a=a, b=b)
            else:
                pair_jobs.append(Job(config, output, cache_root, tokens, (a, b), pair_states))
        log(f"{len(mine) - len(pair_jobs)} of {len(mine)} pairs already finished or blocked; {len(pair_jobs)} to run")
        _run_jobs(pair_job, pair_jobs, pool, _describe_pair, log, "pairs")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return finish(config, output, log)


def finish(config: SweepConfig, output: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes ``summary.json`` and the report from what ``output`` holds; returns the summary."""
    from jaxind import testhooks
    from jaxind.io import destinations
    from jaxind.many import provenance, sweep_summary

    summary = sweep_summary.build(config, output)
    summary["report"] = provenance.write_report(summary, output)
    testhooks.stop_at("summary_writing")
    destinations.write_text(os.path.join(output, "summary.json"), _dumps(summary))
    _written.append(os.path.join(output, "summary.json"))
    log(provenance.text_summary(summary))
    return summary
