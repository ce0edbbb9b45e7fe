"""Bad input through the real CLIs (``python -m jaxind.main``, ``python -m converters.convert``).

Every case of the matrix must end with exactly one ``error:`` line on stderr, no traceback, exit
status 1; cases marked ``before_work`` must fail before a model is loaded (no ``model_a:`` line,
nothing written). The matrix is a table of :class:`Case` rows, run two at a time; append rows
to extend it. Further down: results never lost, Ctrl-C, converter races and kills, file modes.

Tiny models (Llama, d=64, 2 layers, h=128, vocab 256): A, A_ft = A + noise, B independent.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, Frozen, alias_bomb, cli_env, error_lines, run_cli
from hf_models import build_torch_model, edit_config, save

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
SHORT = ["--num_sequences=4", "--seq_len=32", "--num_perms=19"]


@dataclasses.dataclass(frozen=True)
class World:
    """Paths every case may use (built once per module)."""

    root: Path
    a: str  # HF dir, model A
    a_ft: str  # A plus noise
    b: str  # independent of A
    ckpt_a: str  # A converted to a jaxind checkpoint
    bad: dict[str, str]  # broken model sources by name

    def pair(self, model_b: str | None = None) -> list[str]:
        return [f"--model_a={self.a}", f"--model_b={model_b or self.a_ft}", *SHORT]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: ``argv(world, case_dir)`` for ``cli``; ``setup(world, case_dir)`` runs first
    (case_dir is empty and private to the case); the error line must contain ``expected``."""

    id: str
    argv: Callable[[World, Path], list[str]]
    expected: str
    cli: str = "main"
    setup: Callable[[World, Path], None] | None = None
    before_work: bool = True  # fails before any model is loaded
    cwd_is_case_dir: bool = False
    check: Callable[[World, Path], None] | None = None  # more assertions after the run


def _write(name: str, content: bytes | str) -> Callable[[World, Path], None]:
    def setup(world: World, d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def _mkdir(*names: str) -> Callable[[World, Path], None]:
    def setup(world: World, d: Path) -> None:
        for name in names:
            (d / name).mkdir(parents=True)

    return setup


def _unchanged_folder(world: World, d: Path) -> None:
    assert sorted(os.listdir(d / "occupied")) == ["keep.txt"] and (d / "occupied" / "keep.txt").read_text() == "mine"


def _edited_ckpt(
    text: str | None = None, remove: str | None = None, meta: dict | None = None, **config_changes
) -> Callable[[World, Path], None]:
    """Copies A's jaxind checkpoint to ``case_dir/ck`` and edits its config (or replaces it with ``text``, or
    removes a stored group, or updates its jaxind_meta.json with ``meta``)."""

    def setup(world: World, d: Path) -> None:
        shutil.copytree(world.ckpt_a, d / "ck")
        config = d / "ck" / "jaxind_config.json"
        if text is not None:
            config.write_text(text)
        elif config_changes:
            config.write_text(json.dumps({**json.loads(config.read_text()), **config_changes}))
        if remove:
            shutil.rmtree(d / "ck" / remove)
        if meta:
            meta_file = d / "ck" / "jaxind_meta.json"
            meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **meta}))

    return setup


def _edited_hf(text: str | None = None, **config_changes) -> Callable[[World, Path], None]:
    """Copies A's HF directory to ``case_dir/hf`` and edits its config.json (or replaces it with ``text``)."""

    def setup(world: World, d: Path) -> None:
        shutil.copytree(world.a, d / "hf")
        if text is not None:
            (d / "hf" / "config.json").write_text(text)
        else:
            edit_config(str(d / "hf"), **config_changes)

    return setup


def _moe_checkpoint(drop: str) -> Callable[[World, Path], None]:
    """Saves a tiny Mixtral (tests/hf_models.py) to ``case_dir/moe`` without the tensor ``drop``."""

    def setup(world: World, d: Path) -> None:
        from safetensors.numpy import load_file, save_file

        path = save(build_torch_model("mixtral", seed=0, vocab_size=TINY["vocab_size"]), str(d / "moe"))
        weights = os.path.join(path, "model.safetensors")
        save_file({k: v for k, v in load_file(weights).items() if k != drop}, weights, metadata={"format": "pt"})

    return setup


def _tiny_gguf(**kwargs) -> Callable[[World, Path], None]:
    """Writes a tiny Llama GGUF (tests/gguf_models.py) to ``case_dir/m.gguf``."""

    def setup(world: World, d: Path) -> None:
        from gguf_models import write_tiny_llama_gguf

        write_tiny_llama_gguf(str(d / "m.gguf"), **kwargs)

    return setup


def _flag(flag: str, expected: str) -> Case:
    """A bad numeric/list flag given with two good models: refused before either is loaded."""
    return Case(f"flag{flag}", lambda w, d: [*w.pair(), flag], expected)


CASES: list[Case] = [
    # --- defects 6/7: numeric flags validated up front ------------------------------------------
    _flag("--batch_size=0", "--batch_size=0"),
    _flag("--batch_size=-2", "--batch_size=-2"),
    _flag("--alpha=-1", "strictly between 0 and 1"),
    _flag("--alpha=5", "strictly between 0 and 1"),
    _flag("--alpha=1", "strictly between 0 and 1"),
    _flag("--alpha=nan", "strictly between 0 and 1"),
    _flag("--generalized_steps=0", "--generalized_steps=0"),
    _flag("--generalized_steps=-3", "--generalized_steps=-3"),
    _flag("--num_perms=0", "--num_perms=0"),
    _flag("--num_sequences=0", "--num_sequences=0"),
    _flag("--seq_len=1", "--seq_len=1"),
    _flag("--seed=-1", "--seed=-1"),
    _flag("--num_perms=many", "invalid literal"),
    _flag("--tests=csu,bogus", "unknown test(s) bogus"),
    _flag("--tests=", "no tests given"),
    _flag("--dtype=float8", "--dtype"),
    _flag("--no_such_flag=1", "Unknown command line flag 'no_such_flag'"),
    _flag("--flagfile=/nonexistent/run.flags", "Unable to open flagfile"),
    _flag("--data=csv:x.csv", "not understood"),
    # --- pods: mesh and multi-host flags ---------------------------------------------------------
    _flag("--mesh=fsdp:2,tensor:4", "--mesh='fsdp:2,tensor:4': expected axis:size pairs over data, fsdp, model"),
    _flag("--mesh=fsdp:-1,model:-1", "at most one axis may be -1"),
    _flag("--mesh=fsdp:3", "needs 3 devices, there are 8"),  # the tests' 8 fake CPU devices
    _flag("--permtest_layer_shards=3", "--permtest_layer_shards=3 must divide the 8 devices"),
    _flag("--num_processes=2", "pass --coordinator_address, --num_processes and --process_id together"),
    _flag(
        "--coordinator_address=127.0.0.1:1",
        "pass --coordinator_address, --num_processes and --process_id together",
    ),
    Case("only_model_a", lambda w, d: [f"--model_a={w.a}"], "pass both"),
    Case("only_model_b", lambda w, d: [f"--model_b={w.a}"], "pass both"),
    # --- defect 8 and 13: data files -------------------------------------------------------------
    Case(
        "jsonl_text_is_number",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'n.jsonl'}"],
        "line 2: 'text' is a JSON number",
        setup=_write("n.jsonl", '{"text": "fine"}\n{"text": 12345}\n'),
    ),
    Case(
        "jsonl_not_json",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'x.jsonl'}"],
        "line 1: not valid JSON",
        setup=_write("x.jsonl", "text: hello\n"),
    ),
    Case(
        "jsonl_array_line",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'x.jsonl'}"],
        "line 1: a JSON array",
        setup=_write("x.jsonl", "[1, 2]\n"),
    ),
    Case(
        "jsonl_no_text_field",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'x.jsonl'}"],
        "no 'text' field (fields: 'body')",
        setup=_write("x.jsonl", '{"body": "hello"}\n'),
    ),
    Case(
        "jsonl_empty",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'e.jsonl'}"],
        "has no documents",
        setup=_write("e.jsonl", ""),
    ),
    Case(
        "jsonl_blank",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'e.jsonl'}"],
        "has no documents",
        setup=_write("e.jsonl", "\n   \n\t\n"),
    ),
    Case(
        "jsonl_binary",
        lambda w, d: [*w.pair(), f"--data=jsonl:{d / 'b.jsonl'}"],
        "line 2: not UTF-8 text",
        setup=_write("b.jsonl", b'{"text": "ok"}\n\xff\xfe\x00\x81\n'),
    ),
    Case(
        "text_binary",
        lambda w, d: [*w.pair(), f"--data=text:{d / 'b.txt'}"],
        "not UTF-8 text",
        setup=_write("b.txt", bytes(range(256))),
    ),
    Case(
        "text_empty",
        lambda w, d: [*w.pair(), f"--data=text:{d / 'e.txt'}"],
        "is empty or only whitespace",
        setup=_write("e.txt", ""),
    ),
    Case("text_is_directory", lambda w, d: [*w.pair(), f"--data=text:{d}"], "is a directory"),
    Case("text_missing", lambda w, d: [*w.pair(), f"--data=text:{d / 'nope.txt'}"], "does not exist"),
    Case(
        "missing_tokenizer",
        lambda w, d: [*w.pair(), f"--data=text:{d / 't.txt'}"],
        "no usable tokenizer",
        setup=_write("t.txt", "plain English text " * 100),
        before_work=False,
    ),
    # --- defect 5: unwritable results destinations (root ignores chmod: use paths no one can write) ---
    Case("output_is_directory", lambda w, d: [*w.pair(), f"--output={d}"], "is a directory"),
    Case("output_trailing_slash", lambda w, d: [*w.pair(), f"--output={d}/new/"], "is a directory"),
    Case(
        "output_under_a_file",
        lambda w, d: [*w.pair(), f"--output={d / 'f' / 'r.json'}"],
        "is a file, not a directory",
        setup=_write("f", "x"),
    ),
    Case("output_in_proc", lambda w, d: [*w.pair(), "--output=/proc/jaxind/r.json"], "cannot be written"),
    Case("output_device", lambda w, d: [*w.pair(), "--output=/dev/null"], "not a regular file"),
    Case(
        "heatmap_is_directory",
        lambda w, d: [*w.pair(), "--tests=match", "--localized", f"--output={d / 'r.json'}"],
        "is a directory",
        setup=_mkdir("r_localized.png"),
    ),
    Case(
        "demo_output_is_a_file",
        lambda w, d: ["--demo_quick", f"--output={d / 'f'}"],
        "is a file",
        setup=_write("f", "x"),
    ),
    # --- defect 13 and classic model sources -----------------------------------------------------
    Case("missing_model_b", lambda w, d: [*w.pair(str(d / "nope"))], "does not exist"),
    Case(
        "missing_relative_path",
        lambda w, d: [*w.pair("models/nope")],
        "models/nope does not exist (no entry 'nope'",
        setup=_mkdir("models"),
        cwd_is_case_dir=True,
    ),
    Case(
        "missing_relative_hub_like",
        lambda w, d: [*w.pair("models/nope")],
        "models/nope does not exist",
        cwd_is_case_dir=True,
    ),
    Case(
        "file_not_gguf", lambda w, d: [*w.pair(str(d / "weights.bin"))], "not a .gguf", setup=_write("weights.bin", "x")
    ),
    Case(
        "unsupported_architecture",
        lambda w, d: [*w.pair(w.bad["unsupported"])],
        "unsupported model_type 'mamba'",
        before_work=False,
    ),
    Case(
        "truncated_safetensors", lambda w, d: [*w.pair(w.bad["truncated"])], "truncated or corrupt", before_work=False
    ),
    Case("corrupt_gguf", lambda w, d: [*w.pair(w.bad["corrupt.gguf"])], "cannot read GGUF", before_work=False),
    Case("nan_weights", lambda w, d: [*w.pair(w.bad["nan"])], "NaN", before_work=False),
    Case(
        "config_weights_mismatch",
        lambda w, d: [*w.pair(w.bad["mismatch"])],
        "config and the weights disagree",
        before_work=False,
    ),
    # --- defect 2 and 9: a checkpoint's config against its weights; configs that are not objects ---
    Case(
        "ckpt_widened_mlp",
        lambda w, d: [*w.pair(str(d / "ck")), "--tests=csu"],
        "is stored with shape (64, 128) but the config implies (64, 256)",
        setup=_edited_ckpt(d_ff=256),
        before_work=False,
    ),
    Case(
        "ckpt_fewer_layers",
        lambda w, d: [*w.pair(str(d / "ck")), "--tests=csu"],
        "that the config (n_layers=1) does not have",
        setup=_edited_ckpt(n_layers=1),
        before_work=False,
    ),
    Case(
        "ckpt_more_layers",
        lambda w, d: [*w.pair(str(d / "ck")), "--tests=csu"],
        "that are not stored",
        setup=_edited_ckpt(n_layers=3),
        before_work=False,
    ),
    Case(
        "ckpt_group_deleted",
        lambda w, d: [*w.pair(str(d / "ck")), "--tests=csu"],
        "missing from params/: layers.1",
        setup=_edited_ckpt(remove="params/layers.1"),
        before_work=False,
    ),
    Case(
        "ckpt_newer_format",
        lambda w, d: [*w.pair(str(d / "ck")), "--tests=csu"],
        "checkpoint format_version 99 in jaxind_meta.json; this jaxind reads formats 1 to 2: convert the model again",
        setup=_edited_ckpt(meta={"format_version": 99}),
        before_work=False,
    ),
    Case(
        "ckpt_config_not_object",
        lambda w, d: [*w.pair(str(d / "ck")), "--tests=csu"],
        "a jaxind config must be a JSON object",
        setup=_edited_ckpt(text="[1,2,3]"),
        before_work=False,
    ),
    Case(
        "hf_config_not_object",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "holds an array, not an object of model settings",
        setup=_edited_hf(text="[1,2,3]"),
        before_work=False,
    ),
    Case(
        "hf_config_size_not_int",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "config.json has hidden_size='abc'; it must be an integer",
        setup=_edited_hf(hidden_size="abc"),
        before_work=False,
    ),
    Case(
        "hf_config_yarn_rope",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "RoPE scaling type 'yarn' is not supported",
        setup=_edited_hf(rope_scaling={"type": "yarn", "factor": 4.0}),
        before_work=False,
    ),
    Case(
        "hf_config_quantised",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "quantised checkpoints (quantization_config: fp8)",
        setup=_edited_hf(quantization_config={"quant_method": "fp8"}),
        before_work=False,
    ),
    Case(
        "hf_config_phi3_longrope",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "RoPE scaling type 'longrope' is not supported",
        setup=_edited_hf(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0] * 4}),
        before_work=False,
    ),
    Case(
        "hf_config_gemma3_bidirectional",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "use_bidirectional_attention=True is not supported",
        setup=_edited_hf(model_type="gemma3_text", use_bidirectional_attention=True),
        before_work=False,
    ),
    Case(
        "hf_config_qwen2_moe_dense_layers",
        lambda w, d: [*w.pair(str(d / "hf"))],
        "dense MLP layers between the MoE layers (decoder_sparse_step=2",
        setup=_edited_hf(model_type="qwen2_moe", decoder_sparse_step=2),
        before_work=False,
    ),
    Case(
        "hf_mixtral_missing_expert",
        lambda w, d: [*w.pair(str(d / "moe"))],
        "1 tensors the config needs are missing: layers.1.expert_up",
        setup=_moe_checkpoint(drop="model.layers.1.block_sparse_moe.experts.3.w3.weight"),
        before_work=False,
    ),
    Case(
        "gguf_mixture_of_experts",
        lambda w, d: [*w.pair(str(d / "m.gguf"))],
        "GGUF mixture of experts lacks llama.expert_used_count",
        setup=_tiny_gguf(metadata={"llama.expert_count": 8}),
        before_work=False,
    ),
    Case(
        "convert_unreadable_gguf_tokenizer",
        lambda w, d: [f"--src={d / 'm.gguf'}", f"--out={d / 'o'}"],
        "--notokenizer",
        cli="convert",
        setup=_tiny_gguf(tokenizer_model="no-such-tokenizer"),
        before_work=False,
    ),
    # --- the converter -----------------------------------------------------------------------------
    Case("convert_no_flags", lambda w, d: [], "--src and --out are required", cli="convert"),
    Case("convert_bad_flag", lambda w, d: ["--overwrite=maybe"], "--overwrite", cli="convert"),
    Case(
        "convert_missing_src", lambda w, d: [f"--src={d / 'nope'}", f"--out={d / 'o'}"], "does not exist", cli="convert"
    ),
    Case("convert_out_exists", lambda w, d: [f"--src={w.a}", f"--out={w.ckpt_a}"], "already exists", cli="convert"),
    Case(
        "convert_out_is_a_file",
        lambda w, d: [f"--src={w.a}", f"--out={d / 'f'}", "--overwrite"],
        "is a file",
        cli="convert",
        setup=_write("f", "x"),
    ),
    Case(
        "convert_out_under_a_file",
        lambda w, d: [f"--src={w.a}", f"--out={d / 'f' / 'ck'}"],
        "is a file, not a directory",
        cli="convert",
        setup=_write("f", "x"),
    ),
    Case(
        "convert_out_in_proc",
        lambda w, d: [f"--src={w.a}", "--out=/proc/jaxind_ck"],
        "cannot be written",
        cli="convert",
    ),
    Case(
        "convert_overwrite_other_folder",
        lambda w, d: [f"--src={w.a}", f"--out={d / 'occupied'}", "--overwrite"],
        "not a jaxind checkpoint",
        cli="convert",
        before_work=False,
        setup=_write("occupied/keep.txt", "mine"),
        check=_unchanged_folder,
    ),
    Case(
        "convert_src_is_checkpoint",
        lambda w, d: [f"--src={w.ckpt_a}", f"--out={d / 'o'}"],
        "already a jaxind checkpoint",
        cli="convert",
        before_work=False,
    ),
    Case(
        "convert_missing_relative",
        lambda w, d: ["--src=models/nope", f"--out={d / 'o'}"],
        "does not exist (no entry",
        cli="convert",
        setup=_mkdir("models"),
        cwd_is_case_dir=True,
    ),
    Case(
        "convert_unsupported",
        lambda w, d: [f"--src={w.bad['unsupported']}", f"--out={d / 'o'}"],
        "unsupported model_type",
        cli="convert",
        before_work=False,
    ),
    Case(
        "convert_truncated",
        lambda w, d: [f"--src={w.bad['truncated']}", f"--out={d / 'o'}"],
        "truncated or corrupt",
        cli="convert",
        before_work=False,
    ),
    Case(
        "convert_corrupt_gguf",
        lambda w, d: [f"--src={w.bad['corrupt.gguf']}", f"--out={d / 'o'}"],
        "cannot read GGUF",
        cli="convert",
        before_work=False,
    ),
    Case(
        "convert_nan",
        lambda w, d: [f"--src={w.bad['nan']}", f"--out={d / 'o'}", "--notokenizer"],
        "NaN",
        cli="convert",
        before_work=False,
    ),
    Case(
        "convert_mismatch",
        lambda w, d: [f"--src={w.bad['mismatch']}", f"--out={d / 'o'}"],
        "disagree",
        cli="convert",
        before_work=False,
    ),
    Case(
        "convert_unhandled_attribute",
        lambda w, d: [f"--src={w.bad['mlp_bias']}", f"--out={d / 'o'}"],
        "mlp_bias",
        cli="convert",
        before_work=False,
    ),
]


def _sweep_yaml(text: str | None = None, **config) -> Callable[[World, Path], None]:
    """Writes ``case_dir/s.yaml``: ``text``, or models A and A_ft plus ``config`` (None values drop keys)."""

    def setup(world: World, d: Path) -> None:
        import yaml

        if text is not None:
            (d / "s.yaml").write_text(text)
            return
        body = {"models": [{"name": "a", "source": world.a}, {"name": "a_ft", "source": world.a_ft}], **config}
        (d / "s.yaml").write_text(yaml.safe_dump({k: v for k, v in body.items() if v is not None}))

    return setup


def _sweep(*extra: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: [f"--config={d / 's.yaml'}", f"--output={d / 'out'}", *extra]


def _sweep_case(id: str, expected: str, setup=None, extra: tuple[str, ...] = (), **kw) -> Case:
    return Case(f"sweep_{id}", _sweep(*extra), expected, cli="sweep", setup=setup or _sweep_yaml(), **kw)


def _other_sweep_in_output(world: World, d: Path) -> None:
    """``case_dir/out`` holds a sweep started with other data settings (seed 5)."""
    _sweep_yaml()(world, d)
    (d / "out").mkdir()
    data = {"kind": "random", "num_sequences": 64, "seq_len": 128, "seed": 5, "tokenizer": None, "path": None}
    (d / "out" / "sweep.json").write_text(json.dumps({"data": data, "vocab": 256}))
    np.save(d / "out" / "tokens.npy", np.zeros((64, 128), np.int32))


ALIAS_BOMB = alias_bomb()


def _assert_no_output(d: Path) -> None:
    assert not (d / "out").exists()


SWEEP_CASES: list[Case] = [
    Case("sweep_no_flags", lambda w, d: [], "pass --config=SWEEP.yaml and --output=DIR", cli="sweep"),
    _sweep_case("config_missing", "does not exist or is not a file", setup=lambda w, d: None),
    _sweep_case("not_yaml", "is not valid YAML at line 2", setup=_sweep_yaml("models:\n\t- {name: a}\n")),
    _sweep_case("not_a_mapping", "must be a YAML mapping", setup=_sweep_yaml("- a\n- b\n")),
    _sweep_case("one_model", "at least 2 entries", setup=_sweep_yaml("models: [{name: a, source: x}]\n")),
    _sweep_case("unknown_key", "unknown key(s) modles", setup=_sweep_yaml(modles=[])),
    _sweep_case(
        "duplicate_names",
        "model name(s) a used twice",
        setup=_sweep_yaml("models: [{name: a, source: x}, {name: a, source: y}]\n"),
    ),
    _sweep_case(
        "bad_name",
        "needs a name of letters",
        setup=_sweep_yaml("models: [{name: a/b, source: x}, {name: c, source: y}]"),
    ),
    _sweep_case("no_source", "needs a 'source'", setup=_sweep_yaml("models: [{name: a}, {name: b, source: y}]\n")),
    _sweep_case("unknown_pair_member", "pair member 'zz' is not a model", setup=_sweep_yaml(pairs=[["a", "zz"]])),
    _sweep_case("pair_twice", "listed twice", setup=_sweep_yaml(pairs=[["a", "a_ft"], ["a_ft", "a"]])),
    _sweep_case("unknown_test", "unknown or no test(s) ['bogus']", setup=_sweep_yaml(tests=["csu", "bogus"])),
    _sweep_case("alpha", "alpha must lie strictly between 0 and 1", setup=_sweep_yaml(alpha=2)),
    _sweep_case("correction", "correction must be one of holm, bonferroni", setup=_sweep_yaml(correction="fdr")),
    _sweep_case("num_perms", "num_perms must be an integer >= 1", setup=_sweep_yaml(num_perms=0)),
    _sweep_case("data_kind", "data.kind must be random, text or jsonl", setup=_sweep_yaml(data={"kind": "csv"})),
    _sweep_case("text_without_path", "data.kind=text needs data.path", setup=_sweep_yaml(data={"kind": "text"})),
    _sweep_case("layers", "is not a layer index", setup=_sweep_yaml(layers="0,x")),
    _sweep_case(
        "unknown_parent",
        "has parent 'zz'",
        setup=_sweep_yaml("models: [{name: a, source: x, parent: zz}, {name: b, source: y}]"),
    ),
    _sweep_case("shard", "--shard=3/2 not understood", extra=("--shard=3/2",)),
    _sweep_case("workers", "--workers", extra=("--workers=0",)),
    _sweep_case(
        "output_is_a_file",
        "is a file, not a directory",
        setup=lambda w, d: (_sweep_yaml()(w, d), _write("out", "x")(w, d)),
    ),
    _sweep_case("report_only_without_sweep", "holds no sweep", extra=("--report_only",)),
    _sweep_case("other_data_in_output", "holds a sweep made with other data settings", setup=_other_sweep_in_output),
    # --- issue 19: sweep config ---
    _sweep_case("yaml_alias", "anchors and aliases (&name, *name) are not allowed", setup=_sweep_yaml(ALIAS_BOMB)),
    _sweep_case("yaml_too_deep", "is nested too deeply", setup=_sweep_yaml("models: " + "[" * 3000 + "]" * 3000)),
    _sweep_case(
        "name_with_newline",
        "needs a name of letters, digits and . _ + - (no '__'), at most 64",
        setup=_sweep_yaml('models: [{name: "a\\n", source: x}, {name: b, source: y}]\n'),
    ),
    _sweep_case(
        "name_too_long",
        "needs a name of letters, digits and . _ + - (no '__'), at most 64",
        setup=_sweep_yaml(f"models: [{{name: {'n' * 200}, source: x}}, {{name: b, source: y}}]\n"),
    ),
    _sweep_case(
        "parent_not_a_name",
        "has parent [0, 1, 2, 3, ...]: give the name of another model",
        setup=_sweep_yaml(f"models: [{{name: a, source: x, parent: {list(range(500))}}}, {{name: b, source: y}}]"),
    ),
    _sweep_case("pairs_wrong_type", "'pairs' must be all", setup=_sweep_yaml(pairs={"bases": "a", "derived": 5})),
    _sweep_case("keys_of_mixed_types", "unknown key(s) 1, foo", setup=_sweep_yaml("models: []\n1: 2\nfoo: 3\n")),
    _sweep_case("layer_pairs_triple", "layer_pairs must be like", setup=_sweep_yaml(layer_pairs=[[0, 1, 2]])),
    _sweep_case(
        "source_not_a_file_name",  # a lone surrogate: printing the model's error line raised UnicodeEncodeError
        "models[0] (a) needs a 'source'",
        setup=lambda w, d: _sweep_yaml(f'models: [{{name: a, source: "x\\ud800"}}, {{name: b, source: {w.a}}}]')(w, d),
    ),
    _sweep_case(
        "too_many_tokens",
        "data asks for 1000000 x 100000 tokens",
        setup=_sweep_yaml(data={"num_sequences": 10**6, "seq_len": 10**5}),
    ),
    _sweep_case(
        "cache_dir_is_a_file",
        "is a file, not a directory",
        setup=lambda w, d: (_sweep_yaml(cache_dir=str(d / "c"))(w, d), _write("c", "x")(w, d)),
    ),
    Case(
        "sweep_cache_dir_flag_is_a_file",
        lambda w, d: [*_sweep()(w, d), f"--cache_dir={d / 'c'}"],
        "is a file, not a directory",
        cli="sweep",
        setup=lambda w, d: (_sweep_yaml()(w, d), _write("c", "x")(w, d)),
        check=lambda w, d: _assert_no_output(d),
    ),
    # --- one-vs-many scans (jaxind.main --reference) ---
    Case("scan_reference_missing", lambda w, d: [f"--model_a={w.a}", f"--reference={d / 'nope'}"], "does not exist"),
    Case(
        "scan_with_model_b",
        lambda w, d: [f"--model_a={w.a}", f"--model_b={w.b}", f"--reference={d}"],
        "pass --model_a=SUSPECT and no --model_b",
    ),
    Case("scan_empty_folder", lambda w, d: [f"--model_a={w.a}", f"--reference={d}"], "holds no model"),
    Case(
        "scan_bad_yaml",
        lambda w, d: [f"--model_a={w.a}", f"--reference={d / 's.yaml'}"],
        "'models' must be a list of at least 1",
        setup=_sweep_yaml("models: []\n"),
    ),
    # --- issue 19: the rest of the 40 (sizes, layers, positional arguments) ---
    _flag("--num_sequences=1000000000000", "--num_sequences=1000000000000 x --seq_len=32 needs about"),
    _flag("--layers=0:999999999", "--layers: layer index 999999999 is past any model's depth"),
    _flag("--layers=99999999999999999999", "layer index 99999999999999999999 is past any model's depth"),
    _flag("--layers=0,5", "--layers names layer 5, but the models have 2 layers: pick layers 0 to 1"),
    _flag("--layer_pairs=0:0,1:9", "--layer_pairs names pair 1:9, but model A has 2 layers and model B 2"),
    Case("positional_argument", lambda w, d: ["--demo_quick", "demo"], "unexpected argument(s) 'demo'"),
    Case("positional_argument_pair", lambda w, d: [*w.pair(), "csu"], "unexpected argument(s) 'csu'"),
    _sweep_case("positional_argument", "unexpected argument(s) 'x'", extra=("x",)),
]
CASES += SWEEP_CASES
# --- issue 19: cache ---
CASES += [
    Case(
        "sweep_cache_not_writable",
        lambda w, d: [*_sweep()(w, d), f"--cache_dir={d / 'cache_file' / 'sub'}"],  # a file is refused earlier
        "is not writable",
        cli="sweep",
        setup=lambda w, d: (_sweep_yaml()(w, d), _write("cache_file", "x")(w, d)),
    ),
]


def _symlink(name: str, target: str) -> Callable[[World, Path], None]:
    def setup(world: World, d: Path) -> None:
        os.symlink(target if target.startswith("/") else str(d / target), d / name)

    return setup


def _fifo(name: str) -> Callable[[World, Path], None]:
    def setup(world: World, d: Path) -> None:
        os.mkfifo(d / name)

    return setup


def _still(name: str, kind: Callable[[int], bool]) -> Callable[[World, Path], None]:
    """``case_dir/name`` still is what it was (a link, a FIFO): never replaced by a regular file."""

    def check(world: World, d: Path) -> None:
        assert kind(os.lstat(d / name).st_mode)

    return check


_is_link, _is_fifo = stat.S_ISLNK, stat.S_ISFIFO


def _coordinator(address: str, expected: str) -> Case:
    """A bad --coordinator_address with the other two multi-host flags: refused at once (issue 19)."""
    flags = [f"--coordinator_address={address}", "--num_processes=2", "--process_id=0", "--distributed_timeout=20"]
    return Case(f"coordinator_{address}", lambda w, d: [*w.pair(), *flags], expected)


ISSUE_19_CASES: list[Case] = [
    # --- issue 19: outputs and the distributed start ---
    Case("output_empty", lambda w, d: [*w.pair(), "--output="], "--output= is empty"),
    Case(
        "output_fifo",
        lambda w, d: [*w.pair(), f"--output={d / 'p.json'}"],
        "is not a regular file",
        setup=_fifo("p.json"),
        check=_still("p.json", _is_fifo),
    ),
    Case(
        "output_link_to_fifo",
        lambda w, d: [*w.pair(), f"--output={d / 'r.json'}"],
        "is not a regular file",
        setup=lambda w, d: (_fifo("p")(w, d), _symlink("r.json", "p")(w, d)),
        check=_still("r.json", _is_link),
    ),
    Case(
        "output_link_to_stdout",  # /dev/stdout's kind of link (stdout is a pipe here; a file: see below)
        lambda w, d: [*w.pair(), f"--output={d / 'out.json'}"],
        "is not a regular file",
        setup=_symlink("out.json", "/proc/self/fd/1"),
        check=_still("out.json", _is_link),
    ),
    Case("demo_output_empty", lambda w, d: ["--demo_quick", "--output="], "--output= is empty"),
    _coordinator("host0", "--coordinator_address=host0: expected HOST:PORT of process 0"),
    _coordinator("127.0.0.1:99999", "with a port in 1..65535"),
    _coordinator("127.0.0.1:", "expected HOST:PORT"),
    _coordinator("no-such-host.invalid:1234", "host 'no-such-host.invalid' does not resolve"),
]
CASES += ISSUE_19_CASES


# --- issue 18: models with different tokenizers ---
def _two_byte_tokenizers(world: World, d: Path) -> None:
    """Copies A's HF directory to ``case_dir/a`` and ``case_dir/b`` with two byte tokenizers (B numbers the 256
    bytes in reverse) and writes a 204-byte text: one window of 32 bytes aligns at 32 positions, too few."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for name, order in (("a", alphabet), ("b", alphabet[::-1])):
        backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(order)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        shutil.copytree(world.a, d / name)
        PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(d / name)
    (d / "t.txt").write_text("plain text. " * 17)


CASES += [
    Case(
        "different_tokenizers_too_few_aligned",
        lambda w, d: [
            f"--model_a={d / 'a'}",
            f"--model_b={d / 'b'}",
            *SHORT,
            "--num_sequences=1",
            f"--data=text:{d / 't.txt'}",
        ],
        "only 32 positions of the 32 text bytes fed align (a token of each ending at the same byte; at least 128 "
        "are needed): feed about 96 more text bytes",
        setup=_two_byte_tokenizers,
        before_work=False,
    ),
]


# --- issue 18 (point 7): quantised GGUF files ---
def _gguf_with_q8_1(world: World, d: Path) -> None:
    """A tiny Llama GGUF whose ``blk.0.attn_k.weight`` is stored as Q8_1 (the gguf package cannot dequantise it)."""
    from gguf_models import write_typed_llama_gguf

    write_typed_llama_gguf(str(d / "m.gguf"), ["Q8_0", "Q8_0", "Q8_1"], d=64, ff=64, vocab=64)


CASES += [
    Case(
        "gguf_tensor_type_not_dequantisable",
        lambda w, d: [*w.pair(str(d / "m.gguf"))],
        "GGUF tensor blk.0.attn_k.weight in",
        setup=_gguf_with_q8_1,
        before_work=False,
    ),
]


def _copy(src: str, dst: Path, **config_changes) -> str:
    shutil.copytree(src, dst)
    if config_changes:
        edit_config(str(dst), **config_changes)
    return str(dst)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    import torch
    from safetensors.numpy import load_file, save_file

    from converters import sources
    from converters.checkpoint import groups_of, save_checkpoint

    root = tmp_path_factory.mktemp("bad_input")
    model = build_torch_model("llama", seed=0, **TINY)
    a = save(model, str(root / "A"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a_ft = save(model, str(root / "A_ft"))
    b = save(build_torch_model("llama", seed=1, **TINY), str(root / "B"))
    cfg, params, meta = sources.read_model(a)
    save_checkpoint(str(root / "ckpt_A"), cfg, groups_of(params), meta)
    bad = {
        "unsupported": _copy(a, root / "unsupported", model_type="mamba"),
        "mismatch": _copy(a, root / "mismatch", intermediate_size=64),
        "mlp_bias": _copy(a, root / "mlp_bias", mlp_bias=True),
        "truncated": _copy(a, root / "truncated"),
        "nan": _copy(a, root / "nan"),
    }
    weights = os.path.join(bad["truncated"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    weights = os.path.join(bad["nan"], "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 3] = np.nan
    save_file(tensors, weights, metadata={"format": "pt"})
    bad["corrupt.gguf"] = str(root / "corrupt.gguf")
    Path(bad["corrupt.gguf"]).write_bytes(b"GGUF" + os.urandom(64))
    return World(root=root, a=a, a_ft=a_ft, b=b, ckpt_a=str(root / "ckpt_A"), bad=bad)


def _run_case(world: World, case: Case) -> tuple[subprocess.CompletedProcess, Path]:
    d = world.root / "cases" / case.id
    d.mkdir(parents=True)
    if case.setup:
        case.setup(world, d)
    cwd = str(d) if case.cwd_is_case_dir else REPO
    return run_cli(case.cli, case.argv(world, d), cwd=cwd, timeout=600), d


@pytest.fixture(scope="module")
def matrix(world) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every case run once, two subprocesses at a time (the CI machine has two cores)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.id: pool.submit(_run_case, world, case) for case in CASES}
        return {name: f.result() for name, f in futures.items()}


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_error_line(matrix, world, case):
    result, case_dir = matrix[case.id]
    errors = error_lines(result.stderr)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert case.expected in errors[0], errors[0]
    if case.before_work:
        assert "model_a:" not in result.stdout and "building a small model zoo" not in result.stdout
        assert "converted" not in result.stderr
    if case.cli == "convert":
        leftovers = [n for n in os.listdir(case_dir) if n.startswith(".tmp-")]
        assert not leftovers and not (case_dir / "o").exists()
    if case.check:
        case.check(world, case_dir)


# --- defect 5: computed results are never lost ------------------------------------------------


def test_results_are_rescued_when_the_output_folder_vanishes(world, tmp_path):
    """--output passes the up-front check, then its folder is replaced by a file while the tests
    run: the results go to the temp folder and the one error line says where."""
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    frozen = Frozen(
        "main",
        [*world.pair(), "--tests=csu", f"--output={out_dir / 'r.json'}"],
        "models_loaded",
        str(tmp_path / "logs"),
    )
    try:
        out_dir.rmdir()
        out_dir.write_text("now a file")
        code = frozen.resume()
        errors = error_lines(frozen.stderr())
        assert code == 1 and len(errors) == 1 and "Traceback" not in frozen.stderr(), frozen.stderr()[-3000:]
        rescued = errors[0].split("saved to ")[1].split(" instead")[0]
        doc = json.loads(Path(rescued).read_text())
        assert doc["tests"]["csu"]["pvalue"] < 1e-3 and doc["model_b"]["source"] == world.a_ft
        os.unlink(rescued)
    finally:
        frozen.close()


def test_results_are_printed_when_no_file_can_be_written(world, tmp_path):
    """A disk that takes no more bytes (RLIMIT_FSIZE): neither --output nor the fallback can be
    written, so the results JSON is printed on stdout."""
    limited = (
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'jaxind.main', *sys.argv[1:]])"
    )
    argv = [*world.pair(), "--tests=csu", f"--output={tmp_path / 'r.json'}"]
    result = subprocess.run(
        [sys.executable, "-c", limited, *argv], capture_output=True, text=True, cwd=REPO, env=cli_env()
    )
    errors = error_lines(result.stderr)
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "printed on stdout" in errors[0] and not (tmp_path / "r.json").exists()
    doc = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert doc["tests"]["csu"]["pvalue"] < 1e-3


# --- defect 11: Ctrl-C --------------------------------------------------------------------------


def _assert_interrupted(frozen: Frozen, code: int, message: str) -> None:
    lines = [line for line in frozen.stderr().splitlines() if line.strip() and not line.startswith("stopped at")]
    assert code == 130 and lines == [message], frozen.stderr()[-3000:]


def test_ctrl_c_in_main_prints_one_line(world, tmp_path):
    frozen = Frozen("main", [*world.pair(), f"--output={tmp_path / 'r.json'}"], "models_loaded", str(tmp_path / "logs"))
    try:
        _assert_interrupted(frozen, frozen.resume(signal.SIGINT), "interrupted; nothing written")
        assert os.listdir(tmp_path) == ["logs"]
    finally:
        frozen.close()


def test_ctrl_c_in_convert_removes_the_partial_checkpoint(world, tmp_path):
    out = tmp_path / "ck"
    frozen = Frozen(
        "convert", [f"--src={world.a}", f"--out={out}", "--notokenizer"], "first_group_written", str(tmp_path / "logs")
    )
    try:
        assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-ck@")]  # the partial checkpoint
        _assert_interrupted(frozen, frozen.resume(signal.SIGINT), "interrupted; partial checkpoint removed")
        assert os.listdir(tmp_path) == ["logs"]
    finally:
        frozen.close()


# --- defects 3, 4, 14: converter races, kills and leftovers -----------------------------------


def _params(path: str):
    from converters import sources

    return sources.read_model(path)[1]


@pytest.fixture(scope="module")
def reference_params(world):
    return {"A": _params(world.a), "B": _params(world.b)}


def _which(out: Path, reference_params) -> str:
    """ "A" or "B": which source ``out`` loads as, leaf for leaf (anything else fails)."""
    import jax

    loaded = jax.tree.leaves(_params(str(out)))
    for name, params in reference_params.items():
        ref = jax.tree.leaves(params)
        if len(ref) == len(loaded) and all(np.array_equal(x, y) for x, y in zip(ref, loaded, strict=True)):
            return name
    raise AssertionError(f"{out} loads as neither A nor B")


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-"))


def test_two_converts_to_one_out_exactly_one_wins(world, tmp_path, reference_params):
    """Both pass the up-front check and write their checkpoint; the first to publish wins, the
    second finds --out taken at its final rename and says so, leaving the winner intact."""
    out = tmp_path / "ck"
    first = Frozen("convert", [f"--src={world.a}", f"--out={out}"], "written", str(tmp_path / "logs_a"))
    second = Frozen("convert", [f"--src={world.b}", f"--out={out}"], "written", str(tmp_path / "logs_b"))
    try:
        assert first.resume() == 0, first.stderr()[-3000:]
        assert second.resume() == 1
        errors = error_lines(second.stderr())
        assert len(errors) == 1 and "appeared while converting" in errors[0] and "Traceback" not in second.stderr()
        assert _which(out, reference_params) == "A" and _temps(tmp_path) == []
        assert (os.stat(out).st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700
    finally:
        first.close()
        second.close()


def test_two_converts_started_together(world, tmp_path, reference_params):
    """No hooks: whatever the interleaving, one succeeds and the other reports the conflict."""
    out = tmp_path / "ck"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "converters.convert", f"--src={src}", f"--out={out}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=cli_env(),
        )
        for src in (world.a, world.b)
    ]
    results = [(p.wait(300), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = [err for code, err in results if code == 1][0]
    assert len(error_lines(loser)) == 1 and ("already exists" in loser or "appeared while converting" in loser)
    winner = "AB"[[code for code, _ in results].index(0)]
    assert _which(out, reference_params) == winner and _temps(tmp_path) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_publish_never_replaces_an_empty_directory(tmp_path, monkeypatch, renameat2):
    """os.rename would silently replace an empty directory that appeared at the destination."""
    from converters import publish

    if not renameat2:
        monkeypatch.setenv(publish.NO_RENAMEAT2_ENV, "1")
    dest = tmp_path / "ck"
    tmp = publish.make_temp_dir(str(dest))
    Path(tmp, "payload").write_text("new")
    dest.mkdir()
    with pytest.raises(publish.DestinationExists):
        publish.publish(tmp, str(dest), overwrite=False)
    assert os.listdir(dest) == [] and os.path.isfile(os.path.join(tmp, "payload"))
    publish.publish(tmp, str(dest), overwrite=True)
    assert os.listdir(dest) == ["payload"] and _temps(tmp_path) == []


def test_stale_temps_are_removed_only_when_their_writer_is_gone(tmp_path):
    import socket

    from converters import publish

    dest = tmp_path / "ck"
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours = Path(publish.make_temp_dir(str(dest)))  # this process: alive
    gone = tmp_path / f".tmp-ck@{socket.gethostname()}@{dead.pid}@new-x"
    elsewhere = tmp_path / f".tmp-ck@some-other-host@{dead.pid}@new-x"
    other_dests = [
        tmp_path / f".tmp-ck2@{socket.gethostname()}@{dead.pid}@new-x",
        tmp_path / f".tmp-ck@x@{socket.gethostname()}@{dead.pid}@new-x",
    ]  # the temp of `ck@x`
    for d in (gone, elsewhere, *other_dests):
        d.mkdir()
    assert publish.clean_stale(str(dest)) == [str(gone)]
    assert ours.is_dir() and elsewhere.is_dir() and all(d.is_dir() for d in other_dests) and not gone.exists()


def test_renameat2_is_available(tmp_path):
    """The atomic path, not the fallback, is what the tests above exercise (Linux CI)."""
    from converters import publish

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("")
    (tmp_path / "b").mkdir()
    assert publish._renameat2(str(tmp_path / "a"), str(tmp_path / "b"), publish._RENAME_EXCHANGE)
    assert os.listdir(tmp_path / "b") == ["x"] and os.listdir(tmp_path / "a") == []


# Kill points of `convert --overwrite`, in order, and which model --out must hold right after a
# SIGKILL there: the old one until the swap, the new one after it. `moved_aside` exists only
# on the fallback path (no renameat2), where --out is briefly absent and the next run restores it.
KILL_POINTS = [
    ("first_group_written", "old", False),
    ("written", "old", False),
    ("swapped", "new", False),
    ("discarding_old", "new", False),
    ("moved_aside", None, True),
    ("swapped", "new", True),
    ("discarding_old", "new", True),
]


def test_overwrite_survives_sigkill_anywhere(world, tmp_path, reference_params):
    """Each run converts the model --out does not hold, with --overwrite, and is killed at the
    next point. After each kill --out loads as exactly the old or exactly the new model; each
    next run removes (or restores) what the killed one left; a last full run leaves nothing."""
    out = tmp_path / "ck"
    assert run_cli("convert", [f"--src={world.a}", f"--out={out}"]).returncode == 0
    holds, previous_leftovers, restore_pending = "A", [], False
    for i, (point, expected, fallback) in enumerate(KILL_POINTS):
        new = "B" if holds == "A" else "A"
        env = {"JAXIND_TEST_NO_RENAMEAT2": "1"} if fallback else {}
        argv = [f"--src={getattr(world, new.lower())}", f"--out={out}", "--overwrite", "--notokenizer"]
        frozen = Frozen("convert", argv, point, str(tmp_path / f"logs{i}"), **env)
        try:
            assert not set(previous_leftovers) & set(_temps(tmp_path)), "the last run's leftovers were not cleaned"
            if restore_pending:
                assert "restored" in frozen.stderr()
            frozen.kill()
        finally:
            frozen.close()
        previous_leftovers = _temps(tmp_path)
        assert previous_leftovers, f"a kill at {point} leaves a temporary directory"
        if expected is None:  # fallback, between its two renames: the next run restores the old model
            assert not out.exists()
            restore_pending = True
            continue
        restore_pending = False
        holds = holds if expected == "old" else new
        assert _which(out, reference_params) == holds, point
    final = run_cli("convert", [f"--src={world.a}", f"--out={out}", "--overwrite", "--notokenizer"])
    assert final.returncode == 0, final.stderr[-3000:]
    assert _which(out, reference_params) == "A" and _temps(tmp_path) == []


def test_restore_after_a_kill_between_the_fallback_renames(world, tmp_path, reference_params):
    """Fallback swap killed with --out absent: a later run to the same --out, even one that is then
    refused, first renames the old checkpoint back."""
    out = tmp_path / "ck"
    assert run_cli("convert", [f"--src={world.a}", f"--out={out}"]).returncode == 0
    frozen = Frozen(
        "convert",
        [f"--src={world.b}", f"--out={out}", "--overwrite", "--notokenizer"],
        "moved_aside",
        str(tmp_path / "logs"),
        JAXIND_TEST_NO_RENAMEAT2="1",
    )
    frozen.kill()
    frozen.close()
    assert not out.exists()
    again = run_cli("convert", [f"--src={world.b}", f"--out={out}"])
    assert again.returncode == 1 and "already exists" in error_lines(again.stderr)[0] and "restored" in again.stderr
    assert _which(out, reference_params) == "A" and _temps(tmp_path) == []


# --- defect 12: file modes ------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_results_json_mode_follows_the_umask(tmp_path, mask):
    from jaxind.stats import results

    path = tmp_path / "r.json"
    path.write_text("{}")
    os.chmod(path, 0o600)  # replaced files get the umask mode too, not the old one
    old = os.umask(mask)
    try:
        results.write_json(str(path), {"x": 1})
        fresh = tmp_path / "fresh.json"
        results.write_json(str(fresh), {"x": 1})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask == os.stat(fresh).st_mode & 0o777
    assert json.loads(path.read_text()) == {"x": 1}


# --- issue 19: outputs never clobber a link or a special file -----------------------------------------


def test_output_through_a_symlink_replaces_its_target(world, tmp_path):
    """--output=res/link.json pointing elsewhere: the target gets the results, the link stays a link, nothing
    else appears in either folder."""
    (tmp_path / "res").mkdir()
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "target.json"
    target.write_text("old")
    os.symlink("../elsewhere/target.json", tmp_path / "res" / "link.json")
    r = run_cli("main", [*world.pair(), "--tests=csu", f"--output={tmp_path / 'res' / 'link.json'}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.islink(tmp_path / "res" / "link.json")
    assert os.readlink(tmp_path / "res" / "link.json") == "../elsewhere/target.json"
    assert json.loads(target.read_text())["tests"]["csu"]["pvalue"] < 1e-3
    assert os.listdir(tmp_path / "res") == ["link.json"] and os.listdir(tmp_path / "elsewhere") == ["target.json"]


def test_output_to_stdout_redirected_to_a_file_is_refused(world, tmp_path):
    """A link to /proc/self/fd/1 (what /dev/stdout is) with stdout redirected to a regular file: refused before
    any model is loaded; the link stays, the redirected file holds no results (the real /dev/stdout is not used:
    the tests may run as root, and before the fix it was replaced by a regular file)."""
    link = tmp_path / "stdout.json"
    os.symlink("/proc/self/fd/1", link)
    with open(tmp_path / "redirected.txt", "w") as out:
        r = subprocess.run(
            [sys.executable, "-m", "jaxind.main", *world.pair(), "--tests=csu", f"--output={link}"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=cli_env(),
            timeout=600,
        )
    errors = error_lines(r.stderr)
    assert r.returncode == 1 and len(errors) == 1 and "is not a regular file" in errors[0], r.stderr[-3000:]
    assert os.path.islink(link) and os.readlink(link) == "/proc/self/fd/1"
    assert "model_a:" not in (tmp_path / "redirected.txt").read_text()


def test_every_output_writer_writes_through_links_and_refuses_special_files(tmp_path):
    """results JSON, text reports, the localized heatmap and the sweep heatmaps: through a symlink the target is
    replaced (the link stays); a FIFO is refused with a JaxindError and stays a FIFO; no temporary is left."""
    from jaxind.errors import JaxindError
    from jaxind.io import destinations
    from jaxind.many import provenance
    from jaxind.stats import localized, results

    writers = {
        "r.json": lambda p: results.write_json(p, {"x": 1}),
        "report.md": lambda p: destinations.write_text(p, "# report\n"),
        "l.png": lambda p: localized.plot_heatmap([[-3.0, -1.0], [-1.0, -4.0]], [0, 1], [0, 1], -2.0, p),
        "h.png": lambda p: provenance.plot_heatmap(
            p, ["a", "b"], np.array([[np.nan, 3.0], [3.0, np.nan]]), [0, 1], "csu", np.eye(2, dtype=bool)
        ),
    }
    (tmp_path / "real").mkdir()
    for name, write in writers.items():
        target = tmp_path / "real" / name
        target.write_bytes(b"old")
        os.symlink(target, tmp_path / name)
        write(str(tmp_path / name))
        assert os.path.islink(tmp_path / name) and target.read_bytes() != b"old", name
        os.mkfifo(tmp_path / f"fifo-{name}")
        with pytest.raises(JaxindError, match="is not a regular file"):
            write(str(tmp_path / f"fifo-{name}"))
        assert _is_fifo(os.lstat(tmp_path / f"fifo-{name}").st_mode)
    assert json.loads((tmp_path / "real" / "r.json").read_text()) == {"x": 1}
    assert (
        (tmp_path / "real" / "l.png").read_bytes()[:4] == (tmp_path / "real" / "h.png").read_bytes()[:4] == b"\x89PNG"
    )
    assert not [n for d in (tmp_path, tmp_path / "real") for n in os.listdir(d) if n.startswith(".tmp-")]


# --- issue 19: the rest of the 40 (help, scans, messages) -------------------------------------------


@pytest.mark.parametrize("cli", ["main", "sweep", "convert"])
def test_help_exits_0(cli):
    """--help prints the flags on stdout and exits 0 (absl's own help flag exits 1)."""
    result = run_cli(cli, ["--help"], timeout=120)
    assert result.returncode == 0 and "error" not in result.stderr, result.stderr[-2000:]
    assert {"main": "--model_a", "sweep": "--config", "convert": "--src"}[cli] in result.stdout


def test_scan_of_a_reference_folder(world, tmp_path):
    """Entries whose names sanitise alike keep distinct names and results; a damaged reference is reported
    as failed and the rest ranked; a byte-identical copy of the suspect ranks first, though a fine-tune's
    p-value reaches the same floor and its name sorts last."""
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copytree(world.a_ft, refs / "x y")
    shutil.copytree(world.b, refs / "x_y")
    shutil.copytree(world.a, refs / "zz_copy")
    shutil.copytree(world.bad["truncated"], refs / "damaged")
    out = tmp_path / "scan.json"
    result = run_cli("main", [f"--model_a={world.a}", f"--reference={refs}", *SHORT, f"--output={out}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(out.read_text())
    ranking = {r["name"]: r for r in doc["ranking"]}
    assert [r["name"] for r in doc["ranking"]] == ["zz_copy", "x_y-2", "x_y", "damaged"], doc["ranking"]
    assert ranking["zz_copy"]["identical"] and not ranking["x_y-2"]["identical"]
    assert ranking["zz_copy"]["log10_pvalue"] == ranking["x_y-2"]["log10_pvalue"] < -50  # the same floor
    assert ranking["x_y-2"]["source"].endswith("x y") and ranking["x_y"]["source"].endswith("x_y")
    assert ranking["x_y"]["log10_pvalue"] > -2 and set(doc["results"]) == {"zz_copy", "x_y-2", "x_y"}
    assert ranking["damaged"]["pvalue"] is None and "truncated or corrupt" in ranking["damaged"]["error"]
    assert "identical files to the suspect" in result.stdout.splitlines()[1]


def test_scan_of_a_sweep_uses_explicit_data_flags(world, tmp_path):
    """--reference=<sweep folder> brings its stored tokens; data flags given explicitly win, and the run says so."""
    sweep = tmp_path / "sweep"
    (sweep / "models").mkdir(parents=True)
    data = {"kind": "random", "num_sequences": 4, "seq_len": 32, "seed": 5, "tokenizer": None, "path": None}
    info = {"data": data, "vocab": 256, "tokenizer": None, "tokenizer_model": None}
    (sweep / "sweep.json").write_text(json.dumps(info))
    np.save(sweep / "tokens.npy", np.random.default_rng(5).integers(0, 256, (4, 32)).astype(np.int32))
    (sweep / "models" / "ft.json").write_text(json.dumps({"name": "ft", "source": world.a_ft, "status": "ok"}))
    out = tmp_path / "scan.json"
    argv = [f"--model_a={world.a}", f"--reference={sweep}", "--num_sequences=6", "--seq_len=16", f"--output={out}"]
    result = run_cli("main", argv, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["data"]["tokens_shape"] == [6, 16]
    assert "reference tokens: from the data flags, not its sweep's stored tokens" in result.stdout


def test_reference_yaml_sources_resolve_against_its_folder(tmp_path, monkeypatch):
    """A relative source in a --reference YAML is taken from the YAML's folder whatever the working directory,
    even where it is missing there and the working directory happens to hold that path."""
    from jaxind.many import sweep_config

    yaml_dir, cwd = tmp_path / "lists" / "sub", tmp_path / "work" / "here"
    yaml_dir.mkdir(parents=True)
    (tmp_path / "lists" / "ref").mkdir()
    (tmp_path / "work" / "decoy").mkdir(parents=True)
    cwd.mkdir()
    (yaml_dir / "refs.yaml").write_text(
        "models:\n  - {name: near, source: ../ref}\n  - {name: missing, source: ../decoy}\n"
        "  - {name: hub, source: org/model}\n  - {name: alias, source: smollm2}\n"
    )
    monkeypatch.chdir(cwd)
    models, _ = sweep_config.load_references(os.path.relpath(yaml_dir / "refs.yaml"))
    sources = {m.name: m.source for m in models}
    assert os.path.realpath(sources["near"]) == str(tmp_path / "lists" / "ref")
    assert os.path.isabs(sources["missing"]) and not os.path.exists(sources["missing"])  # not ../decoy of the cwd
    assert sources["missing"].startswith(str(yaml_dir)) and sources["hub"] == "org/model"
    assert sources["alias"] == "smollm2"


def test_memory_check_names_the_size_and_the_limit(monkeypatch):
    from jaxind.errors import JaxindError
    from jaxind.io import token_source as data
    from jaxind.models.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      d_ff=128)  # fmt: skip
    spec = data.DataSpec(num_sequences=1000, seq_len=100)
    need = data.memory_needed(spec, [cfg], batch_size=8, fingerprint=True)
    assert need["tokens"] == 12 * 100_000 and need["fingerprints"] == 4 * 100_000 * 64 * 2
    assert need["activations"] == 4 * 8 * 100 * (4 * 64 + 2 * 128 + 256 + 4 * 100)
    monkeypatch.setattr(data, "available_memory", lambda: 2**20)
    expected = r"needs about 53\.5 MiB of memory \(tokens .*fingerprints .*\) and 1\.0 MiB is available"
    with pytest.raises(JaxindError, match=expected):
        data.check_memory(spec, [cfg], batch_size=8, fingerprint=True)
    monkeypatch.setattr(data, "available_memory", lambda: 2**30)
    data.check_memory(spec, [cfg], batch_size=8, fingerprint=True)


def test_report_md_escapes_error_text(tmp_path):
    """Error text in report.md cannot open a heading, a table cell, a link or raw HTML."""
    from jaxind.many import provenance

    evil = "<img src=x onerror=alert(1)> a | b [click](javascript:alert(1))\n# Owned *x*"
    summary = {
        "counts": {"models": 2, "pairs": 1},
        "verdict": "no dependent pair",
        "dependent_pairs": [],
        "tests": ["csu"],
        "pairs": [{"a": "m1", "b": "m2", "status": "error", "error": evil, "dependent": False}],
        "models": [{"name": "m1", "status": "error", "error": evil}, {"name": "m2", "status": "ok"}],
    }
    md = provenance.render_markdown(summary, {"graph": "provenance.png", "heatmaps": {}})
    failures = md[md.index("## Failures") :].splitlines()[2:]
    assert len(failures) == 2 and all(line.startswith(("- m1 vs m2: ", "- m1: ")) for line in failures), failures
    for line in failures:
        assert "<img" not in line and "](" not in line and " | " not in line and "&lt;img" in line
    assert not any(line.startswith("#") and "Owned" in line for line in md.splitlines())


def test_disk_warning_names_the_1_gib_reserve(tmp_path, monkeypatch):
    import collections

    from jaxind.many import modelstore

    params = {"w": np.zeros((1024, 1024), np.float32)}  # 4 MiB
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(modelstore.shutil, "disk_usage", lambda path: usage(2**40, 0, 2**29))  # 0.5 GiB free
    with pytest.raises(OSError) as e:
        modelstore._check_room(str(tmp_path), params, "src")
    assert "plus 1 GiB kept free" in str(e.value) and "0.5 GiB free" in str(e.value)


def test_sweep_tokenizer_error_names_both_models(monkeypatch):
    import types

    from jaxind.errors import JaxindError
    from jaxind.io import token_source as data
    from jaxind.io import tokenizer
    from jaxind.many import sweep

    class Differs:
        def check(self, a, b):
            raise JaxindError("window 1 (byte offset 0): token 3 differs")

    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda spec: object())
    monkeypatch.setattr(data, "text_windows", lambda spec, tok: Differs())
    stored = types.SimpleNamespace(name="tuned", meta={"tokenizer": {"kind": "dir", "path": "/t"}})
    d = {"kind": "text", "path": "x.txt", "num_sequences": 2, "seq_len": 8, "seed": 0}
    info = {"tokenizer": {"kind": "dir", "path": "/b"}, "tokenizer_model": "base", "vocab": 256}
    with pytest.raises(JaxindError, match="model tuned's tokenizer differs from model base's, which cut the text"):
        sweep.check_tokenizer(stored, d, info)
