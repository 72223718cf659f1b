"""Human-readable summaries of a run: the per-layer table and the file sizes."""

from __future__ import annotations

from pathlib import Path

from onnxq.graph.layers import grouped_reasons
from onnxq.pipeline import QuantizationResult
from onnxq.report.evaluate import EvalResult
from onnxq.report.kernels import kernel_report, latency


def human_bytes(size: int) -> str:
    """Bytes as B/KB/MB/GB (decimal units, as file managers show)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} GB"


def layer_table(result: QuantizationResult) -> str:
    """One line per layer: name, op, weight shape, bits (stored), relative reconstruction error."""
    header = ("layer", "op", "shape", "bits", "rel. error")
    rows = [(r.name, r.op_type, "x".join(map(str, r.shape)),
             f"{r.bits}" + (f" (in INT{r.stored_bits})" if r.stored_bits != r.bits else ""),
             f"{r.relative_error:.2e}") for r in result.layers]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(result: QuantizationResult) -> str:
    """Sizes, average widths and the check of the written model."""
    lines = [
        f"method {result.method}, {len(result.layers)} layers quantized, "
        f"{result.calibration_samples} calibration samples",
        f"average weight bits: {result.average_bits(stored=False):.2f} logical, "
        f"{result.average_bits(stored=True):.2f} stored"
        + (" (codes plus block-wise scales and zero points)" if any(r.scale_bits for r in result.layers) else ""),
        f"size: float {human_bytes(result.float_bytes)} -> {human_bytes(result.output_bytes)} "
        f"({result.size_ratio:.3f}x)",
    ]
    if result.output_sqnr_db is not None:
        where = "held-out samples" if result.check_held_out else "a calibration batch (no held-out samples left)"
        check = f"output SQNR on {where}: {result.output_sqnr_db:.1f} dB"
        if result.top1_agreement is not None:
            check += f", top-1 agreement with the float model {100 * result.top1_agreement:.1f} %"
        if result.check_kl is not None:
            check += f", KL {result.check_kl:.3f}"
        lines.append(check)
    plan = result.mixed
    if plan is not None:
        lines.append(f"mixed precision ({plan.estimator} sensitivities, {plan.evaluations} forward passes, "
                     f"{plan.seconds.get('sensitivity', 0):.0f} s): predicted loss increase {plan.predicted_loss:.4g}, "
                     f"solver {plan.status} (gap {100 * plan.gap:.2g} %), budget use "
                     f"{100 * plan.used_bits / plan.budget_bits:.1f} %")
        if plan.verified:
            measured = ", ".join(f"{label} {loss:.4g}" + (f" (stopped after {plan.stopped[label]} samples)"
                                                           if label in plan.stopped else "")
                                 for label, loss in plan.verified.items())
            lines.append(f"measured loss on the verification samples: {measured}; kept {plan.picked}")
        if plan.integer_mac_share is not None:
            lines.append(f"--prefer speed: {100 * plan.integer_mac_share:.1f} % of the multiply-adds are in 8-bit "
                         "layers (W8A8, integer kernels); the rest run weight-only in float")
    for reason in grouped_reasons(result.skipped):
        lines.append(f"not quantized: {reason}")
    lines.append(f"wrote {result.output}" if result.output else "the quantized model is in result.model")
    return "\n".join(lines)


def eval_summary(result: EvalResult) -> str:
    """The evaluation figures, one per line."""
    lines = [f"samples: {result.samples}"]
    if result.top1 is not None:
        lines.append(f"top-1: {result.top1:.2f} % (reference {result.reference_top1:.2f} %)")
        lines.append(f"top-5: {result.top5:.2f} % (reference {result.reference_top5:.2f} %)")
    if result.agreement is not None:
        lines.append(f"top-1 agreement with the reference: {result.agreement:.2f} %")
        lines.append(f"mean KL divergence: {result.mean_kl:.5f}")
    lines.append(f"output SQNR: {result.sqnr_db:.2f} dB, cosine similarity {result.cosine:.6f}, "
                 f"max abs error {result.max_error:.4g}")
    return "\n".join(lines)


def kernel_table(float_path: Path, quantized_path: Path) -> str:
    """What onnxruntime really runs: the kernel per layer, and float vs quantized latency at batch 1 and 32."""
    rows = kernel_report(quantized_path)
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer'.ljust(width)}  kernel", f"{'-' * width}  ------"]
    lines += [f"{r['layer'].ljust(width)}  {r['kernel']} ({r['runs']})" for r in rows]
    for batch in (1, 32):
        reference, quantized = latency(float_path, batch), latency(quantized_path, batch)
        lines.append(f"latency at batch {batch}: float {reference:.1f} ms, quantized {quantized:.1f} ms "
                     f"({reference / quantized:.2f}x)")
    return "\n".join(lines)
