"""The config: one definition per option, validated once; the CLI generated from it; the typed API; lazy imports."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import tiny

import onnxq
from onnxq import config as cfg
from onnxq.cli import cli, config_from_flags
from onnxq.config import OPTIONS, Config
from onnxq.errors import OnnxqError


def parse(*flags: str) -> Config:
    """The Config a quantize command line asks for, parsed in-process (nothing is run)."""
    command = cli.commands["quantize"]
    ctx = command.make_context("quantize", ["m.onnx", "--calib", "c", "-o", "o.onnx", *flags])
    return config_from_flags(ctx)


def test_vocabularies_match_the_modules_that_implement_them():
    """config.py repeats these so that --help imports none of the heavy modules; they must not drift apart."""
    from onnxq.allocation.mixed import ESTIMATORS
    from onnxq.graph.layers import QUANTIZABLE_OPS
    from onnxq.passes import DEFAULT_METHOD, ROUNDING_PASSES, SUPPORTED_BITS
    from onnxq.passes.histogram import METHODS as ACT_METHODS

    assert cfg.WIDTHS == SUPPORTED_BITS and cfg.OP_TYPES == QUANTIZABLE_OPS and cfg.ESTIMATORS == ESTIMATORS
    assert set(cfg.METHODS) == set(ROUNDING_PASSES) and Config().rounding.method == DEFAULT_METHOD
    assert set(cfg.ACT_METHODS) == set(ACT_METHODS)


def test_defaults_are_the_pipelines_former_defaults():
    from onnxq.pipeline import act_bits, budget_of, held_out_needed, prefer, verify_samples

    config = Config()  # the default run: 4-bit COMQ, asymmetric, clipped, bias-corrected, shrunk, weight-only
    rounding = config.rounding
    assert (config.layers.bits, rounding.method, bool(rounding.symmetric), rounding.clip) == (None, "comq", False, True)
    assert rounding.bias_correction and rounding.shrinkage and not rounding.sequential
    assert (act_bits(config), prefer(config), budget_of(config).is_set(), verify_samples(config)) == (
        None, "size", False, 0)
    assert (config.data.calib_size, config.data.batch_size, held_out_needed(config)) == (256, 16, 16)
    assert verify_samples(Config.from_options(avg_bits=3)) == 512


INVALID = [
    (["--accuracy-level", "4"], "--accuracy-level needs --matmul-nbits"),
    (["--prefer", "speed"], "--prefer needs --act-bits 8"),
    (["--act-method", "percentile"], "--act-method needs --act-bits 8"),
    (["--calibration_method", "minmax"], "--act-method needs --act-bits 8"),
    (["--stats", "s.npz", "--sequential"], "--stats is not used by --sequential"),
    (["--sensitivity", "exact"], "--sensitivity needs a budget"),
    (["--clado-samples", "8", "--bit-choices", "2,4"], "--bit-choices, --clado-samples need a budget"),
    (["--verify-samples", "8"], "--verify-samples needs a budget"),
    (["--sensitivity-cache", "o.npz"], "--sensitivity-cache needs a budget"),
    (["--avg-bits", "3", "--bits", "4"], "drop --bits"),
    (["--avg-bits", "3", "--size-mb", "1"], "give one budget, not --avg-bits and --size-mb"),
    (["--avg-bits", "3", "--sensitivity", "diagonal", "--verify-samples", "64"], "drop --verify-samples"),
    (["--avg-bits", "5", "--act-bits", "8", "--prefer", "speed", "--verify-samples", "64"], "drop --verify-samples"),
    (["--act-bits", "8", "--asymmetric"], "drop --asymmetric"),
    (["--matmul-nbits", "--op-types-to-quantize", "Conv,Gemm"], "add MatMul"),
    (["--block-size", "32", "--op-types-to-quantize", "Conv"], "--block-size applies to MatMul and Gemm"),
    (["--matmul-nbits", "--bits", "8"], "--matmul-nbits writes MatMul layers with 3- or 4-bit codes"),
    (["--avg-bits", "-1"], "--avg-bits must be positive"),
    (["--avg-bits", "nan"], "--avg-bits takes a finite number"),
    (["--size-ratio", "inf"], "--size-ratio takes a finite number"),
    (["--avg-bits", "3", "--bit-choices", "2,5"], "--bit-choices must be among 2, 3, 4, 8"),
    (["--op-types-to-quantize", "Relu"], "--op-types-to-quantize must be among Conv, Gemm, MatMul"),
    (["--nodes-to-exclude", "conv[1"], "is not a regular expression"),
    (["--accuracy-level", "5", "--matmul-nbits"], "--accuracy-level must be at most 4"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--clado-time-limit", "0", "--avg-bits", "3"], "--clado-time-limit must be positive"),
]


@pytest.mark.parametrize(("flags", "message"), INVALID, ids=[" ".join(f) for f, _ in INVALID])
def test_each_invalid_combination_is_an_error_that_says_what_to_do(flags, message):
    with pytest.raises(OnnxqError, match=re.escape(message)):
        parse(*flags)


def test_the_same_combinations_are_errors_in_the_keyword_api():
    for options, message in [({"accuracy_level": 4}, "--accuracy-level needs --matmul-nbits"),
                             ({"prefer": "speed"}, "--prefer needs --act-bits 8"),
                             ({"clado_samples": 8}, "needs a budget"), ({"bits": 7}, "--bits must be among"),
                             ({"bit": 4}, "unknown option(s) ['bit']"), ({"bits": 4.0}, "whole number")]:
        with pytest.raises(OnnxqError, match=re.escape(message)):
            Config.from_options(**options)


def sample_flag(spec: cfg.Spec) -> tuple[list[str], object]:
    """A command line that sets ``spec`` to a non-default value, and the value the config should hold."""
    if spec.kind == "bool":
        flag = spec.off if spec.default is True else spec.flag
        return [flag], spec.default is not True
    if spec.kind == "path":
        return [spec.flag, "some/file.bin"], Path("some/file.bin")
    if spec.kind == "names":
        values = ("Gemm", "MatMul") if spec.choices else ("conv1", "fc.*")
        return [spec.flag, values[0], spec.flag, values[1]], values
    if spec.kind == "widths":
        return [spec.flag, "8,2"], (2, 8)
    if spec.choices:
        value = next((c for c in reversed(spec.choices) if c != spec.default), spec.choices[0])
        return [spec.flag, str(value)], value
    value = {"int": 3, "float": 2.5, "str": "auto"}[spec.kind]  # free text: --ray-address
    return [spec.flag, str(value)], value


NEEDS = {"mixed": ["--avg-bits", "3"], "activations": ["--act-bits", "8"]}
FLAGGED = [spec for spec in OPTIONS.values() if spec.flag]


@pytest.mark.parametrize("spec", FLAGGED, ids=[s.flag for s in FLAGGED])
def test_round_trip_every_flag_reaches_its_config_field(spec):
    flags, expected = sample_flag(spec)
    context = [] if spec.name in ("avg_bits", "act_bits") else NEEDS.get(spec.section, [])
    if spec.name == "accuracy_level":
        context = ["--matmul-nbits"]
    if spec.section == "mixed" and spec.name in ("size_mb", "size_ratio"):
        context = []
    config = parse(*context, *flags)
    assert getattr(getattr(config, spec.section), spec.attr) == expected
    described = cfg.described(config)
    assert described[spec.name] == expected  # and only what was asked differs from the defaults
    assert set(described) <= {spec.name, *(n for n in OPTIONS if n in {"avg_bits", "act_bits", "matmul_nbits"})}
    assert Config.from_options(**described) == config


def test_round_trip_a_full_command_line():
    config = parse("--bits", "3", "--first-last-bits", "8", "--method", "gptq", "--symmetric", "--no-clip",
                   "--sequential", "--block_size", "64", "--nodes_to_exclude", "a,b", "--op_types_to_quantize",
                   "MatMul", "--matmul-nbits", "--accuracy_level", "4", "--calib-size", "0", "--batch-size", "4",
                   "--act-bits", "8", "--calibration_method", "minmax", "--prefer", "speed", "--no-external-data",
                   "--mean", "1,2,3", "--scale", "1")
    from onnxq.data.images import ImagePreprocessing

    assert config == Config(
        rounding=cfg.Rounding(method="gptq", symmetric=True, clip=False, sequential=True, block_size=64),
        layers=cfg.Layers(bits=3, first_last_bits=8, nodes_to_exclude=("a", "b"), op_types_to_quantize=("MatMul",)),
        activations=cfg.Activations(method="minmax", prefer="speed"),
        data=cfg.Data(calib_size=0, batch_size=4, preprocessing=ImagePreprocessing(mean=(1, 2, 3), scale=1.0)),
        export=cfg.Export(matmul_nbits=True, accuracy_level=4, external_data=False))
    assert parse() == Config()


def test_help_shows_one_spelling_per_flag_and_no_benchmark_figures():
    from click.testing import CliRunner

    text = CliRunner().invoke(cli, ["quantize", "--help"], terminal_width=200).output
    listed = re.findall(r"^\s+(-\w, )?(--[\w-]+)(?: / (--[\w-]+))?", text, re.MULTILINE)
    names = [name for _, first, second in listed for name in (first, second) if name]
    normalised = [n.replace("_", "-") for n in names]
    assert len(normalised) == len(set(normalised)), names
    assert not any("_" in n for n in names), names  # the ORT spellings are hidden aliases
    assert {spec.flag for spec in FLAGGED} <= set(names)
    assert not re.search(r"\d(\.\d+)?x\b|\d+ ?%", text), "benchmark figures belong in the README"


def test_config_is_frozen_and_never_changed_by_derivation():
    layers = {"conv1": 8}
    base = Config(layers=cfg.Layers(bits_per_layer=layers))
    layers["fc"] = 2  # the caller's dict changing later does not reach the config
    assert dict(base.layers.bits_per_layer) == {"conv1": 8}
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.layers.bits = 2
    derived = base.with_options(avg_bits=3, act_bits=8, prefer="speed")
    assert base.mixed is None and base.activations is None and derived.mixed.avg_bits == 3
    assert derived.with_options(act_bits=None).activations is None  # clearing what asks for a section drops it
    with pytest.raises(OnnxqError, match="--prefer needs --act-bits"):
        derived.with_options(act_bits=None, prefer="size")


def test_legacy_budget_keyword_maps_to_the_mixed_section():
    from onnxq.allocation.mixed import Budget

    assert Config.from_options(budget=Budget(size_ratio=0.2)).mixed == cfg.MixedPrecision(size_ratio=0.2)
    assert Config.from_options(budget=Budget()).mixed is None


def test_api_takes_a_model_proto_and_returns_the_model_in_memory(tmp_path, cnn_calib):
    proto = tiny.cnn_model()
    before = proto.SerializeToString()
    config = Config(rounding=cfg.Rounding(method="rtn"), layers=cfg.Layers(bits=8))
    result = onnxq.quantize(proto, cnn_calib, config=config, first_last_bits=4)
    assert result.output is None and isinstance(result.model, onnx.ModelProto)
    assert proto.SerializeToString() == before and config.layers.first_last_bits is None
    bits = {r.name: r.bits for r in result.layers}
    assert bits["conv1"] == bits["fc"] == 4 and bits["conv2_grouped"] == 8
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert types["c2_w_quantized"] == onnx.TensorProto.INT8
    assert not list(tmp_path.glob("*.onnx"))


def test_missing_bits_json_without_a_budget_is_an_error(tmp_path, cnn_path, cnn_calib):
    with pytest.raises(OnnxqError, match="without a budget it is read"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "q.onnx", bits_json=tmp_path / "missing.json")
    assert not (tmp_path / "q.onnx").exists()


def test_everything_the_readme_shows_is_importable_from_onnxq():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = set(re.findall(r"\bonnxq\.([A-Za-z_]\w*)\(", readme))
    for imported in re.findall(r"^from onnxq import (.+)$", readme, re.MULTILINE):
        names |= {n.strip() for n in imported.split(",")}
    assert {"quantize", "Config", "MixedPrecision", "Budget"} <= names
    assert all(hasattr(onnxq, name) for name in names), sorted(n for n in names if not hasattr(onnxq, n))


HEAVY = ("onnxruntime", "scipy", "matplotlib", "ray")


def test_importing_the_cli_and_the_package_stays_light():
    code = ("import sys, onnxq, onnxq.cli; onnxq.Config(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["-m", "onnxq", "--help"], ["-m", "onnxq", "quantize", "--help"]])
def test_help_imports_neither_onnxruntime_nor_scipy(command):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "Usage" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert imported and not {m for m in imported if m.split(".")[0] in HEAVY}
