"""Explain a quantized model in one self-contained HTML page (plots inlined as PNG data URIs) and as JSON.

The page and the JSON are rendered from the same context dict, built by :func:`report_context`:
``sizes`` (float, quantized, codes, in bytes), ``eval`` (an ``EvalResult.as_dict()`` or None), ``layers``
(rows of :func:`onnxq.report.diagnostics.layer_diagnostics`), ``sensitivity`` (CLADO's ``omega`` over ``keys``
``[layer, bits]`` and the ``chosen`` widths, or None) and ``curve`` (points with ``size_bytes``, ``top1`` or
``agreement``, and optional ``label`` and ``series``), plus titles and metadata. Plots use matplotlib's Agg
canvas directly (no pyplot, no global backend switch); matplotlib is the optional extra ``onnxq[report]``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from onnxq import __version__
from onnxq.allocation.mixed import MixedPlan
from onnxq.errors import OnnxqError
from onnxq.export.atomic import write_text
from onnxq.report.diagnostics import diagnostics_on_data, file_size

BIT_COLOURS = {2: "#d62728", 3: "#ff7f0e", 4: "#1f77b4", 8: "#2ca02c"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1100px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:8px 0 2px}
h2{font-size:19px;margin:32px 0 8px;border-bottom:2px solid #dde2ea;padding-bottom:4px}
.sub{color:#5b6474;font-size:13px;margin:0 0 16px}.note{color:#5b6474;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:10px 16px;min-width:150px}
.card b{display:block;font-size:22px}.card span{color:#5b6474;font-size:12px}
img{max-width:100%;background:#fff;border:1px solid #dde2ea;border-radius:8px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:12.5px}
th,td{padding:4px 8px;border-bottom:1px solid #e7eaf0;text-align:right;white-space:nowrap}
th{background:#eef1f6;position:sticky;top:0}td.l,th.l{text-align:left}
tr:hover td{background:#f3f7ff}.bits{display:inline-block;min-width:22px;border-radius:4px;color:#fff;text-align:center}
"""


def report_context(quantized: str | Path, reference: str | Path, layers: list[dict], evaluation: dict | None = None,
                   plan: MixedPlan | None = None, curve: list[dict] | None = None) -> dict:
    """Everything the report shows: sizes, metadata, eval figures, per-layer rows, sensitivity, curve."""
    quantized, reference = Path(quantized), Path(reference)
    meta = {p.key: p.value for p in onnx.load(str(quantized), load_external_data=False).metadata_props}
    params = sum(row["params"] for row in layers)
    return {
        "title": f"onnxq report: {quantized.name}", "quantized": str(quantized), "reference": str(reference),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "onnxq_version": __version__,
        "method": meta.get("onnxq.method"),
        "mixed_precision": json.loads(meta["onnxq.mixed_precision"]) if "onnxq.mixed_precision" in meta else None,
        "sizes": {"float_bytes": file_size(reference), "quantized_bytes": file_size(quantized),
                  "code_bytes": sum(row["code_bytes"] for row in layers)},
        "average_bits": sum(row["params"] * row["bits"] for row in layers) / params if params else None,
        "average_stored_bits": sum(row["params"] * row["stored_bits"] for row in layers) / params if params else None,
        "eval": evaluation, "layers": layers, "curve": curve or [],
        "sensitivity": None if plan is None or plan.omega is None else
        {"omega": plan.omega, "keys": [list(k) for k in plan.keys], "chosen": plan.bits},
    }


def write_report_json(path: str | Path, context: dict) -> None:
    """The report's numbers as JSON (non-finite values as null), written atomically."""
    write_text(Path(path), json.dumps(_plain(context), indent=1, allow_nan=False), "report")


def write_report(path: str | Path, context: dict) -> None:
    """The report as one self-contained HTML file, written atomically."""
    figure = _figure_class()
    sections = [_summary(context), _widths(context, figure), _sqnr(context, figure),
                _sensitivity(context, figure), _curve(context, figure), _table(context)]
    title = html.escape(context.get("title", "onnxq report"))
    description = f"<p>{html.escape(context['description'])}</p>\n" if context.get("description") else ""
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head>\n"
            f"<body><main>\n<h1>{title}</h1>\n<p class=\"sub\">{_header_line(context)}</p>\n{description}"
            + "\n".join(sections) + "\n</main></body></html>\n")
    write_text(Path(path), page, "report")


def require_matplotlib() -> None:
    """Fail early, before any work, when the HTML report cannot be drawn."""
    _figure_class()


def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise OnnxqError("the HTML report needs matplotlib; install it with: pip install 'onnxq[report]'") from err
    return Figure


# ---- page sections -------------------------------------------------------------------------------------


def _header_line(context: dict) -> str:
    parts = [f"quantized <code>{html.escape(context['quantized'])}</code>",
             f"reference <code>{html.escape(context['reference'])}</code>"]
    if context.get("method"):
        parts.append(f"method {html.escape(context['method'])}")
    parts.append(f"onnxq {html.escape(context.get('onnxq_version', ''))}, {html.escape(context.get('created', ''))}")
    return " &middot; ".join(parts)


def _summary(context: dict) -> str:
    sizes, ev, layers = context["sizes"], context.get("eval") or {}, context["layers"]
    cards = [(_mb(sizes["float_bytes"]), "float model"), (_mb(sizes["quantized_bytes"]), "quantized model"),
             (f"{sizes['quantized_bytes'] / sizes['float_bytes']:.3f}x" if sizes["float_bytes"] else "–",
              "size ratio"),
             (_num(context.get("average_bits"), 2), "average weight bits"),
             (_num(context.get("average_stored_bits"), 2), "average stored bits"), (str(len(layers)), "layers")]
    accuracy = [(ev.get("top1"), "top-1 %", 2), (ev.get("reference_top1"), "reference top-1 %", 2),
                (ev.get("top5"), "top-5 %", 2), (ev.get("reference_top5"), "reference top-5 %", 2),
                (ev.get("agreement"), "top-1 agreement %", 2), (ev.get("mean_kl"), "mean KL", 5),
                (ev.get("sqnr_db"), "output SQNR dB", 2), (ev.get("cosine"), "cosine similarity", 6)]
    acc_cards = [(_num(v, d), label) for v, label, d in accuracy if v is not None]
    samples = f" on {ev['samples']} samples" if ev.get("samples") else ""
    acc_html = (_cards(acc_cards) if acc_cards else
                "<p class=\"note\">No accuracy figures: run <code>onnxq eval --report</code> to add them.</p>")
    mixed = context.get("mixed_precision")
    mixed_html = "" if not mixed else (
        f"<p class=\"note\">Mixed precision: {html.escape(str(mixed.get('estimator')))} sensitivities, predicted "
        f"loss increase {_num(mixed.get('predicted_loss'), 4, 'g')}, solver {html.escape(str(mixed.get('status')))}"
        f" (gap {_num(100 * (mixed.get('gap') or 0), 2, 'g')} %).</p>")
    return (f"<section id=\"summary\"><h2>Size</h2>{_cards(cards)}{mixed_html}</section>\n"
            f"<section id=\"accuracy\"><h2>Accuracy{html.escape(samples)}</h2>{acc_html}</section>")


def _widths(context: dict, figure: type) -> str:
    layers = context["layers"]
    if not layers:
        return "<section id=\"widths\"><h2>Bit widths</h2><p class=\"note\">No quantized layers.</p></section>"
    fig, ax = _axes(figure, 3.0)
    x = np.arange(len(layers))
    ax.bar(x, [r["bits"] for r in layers], color=[_colour(r["bits"]) for r in layers], width=0.8)
    ax.set_ylabel("weight bits")
    ax.set_yticks(sorted({r["bits"] for r in layers}))
    _layer_axis(ax, layers)
    _bit_legend(ax, layers)
    return _section("widths", "Bit widths along the network", _png(fig),
                    "One bar per quantized layer, in graph order. 3-bit codes are stored in INT4.")


def _sqnr(context: dict, figure: type) -> str:
    layers = context["layers"]
    out = [r["output_sqnr_db"] if _finite(r.get("output_sqnr_db")) else np.nan for r in layers]  # no bar: exact
    if all(np.isnan(out)):
        return "<section id=\"sqnr\"><h2>Per-layer SQNR</h2><p class=\"note\">Not measured.</p></section>"
    fig, ax = _axes(figure, 3.4)
    x = np.arange(len(layers))
    ax.bar(x, out, color=[_colour(r["bits"]) for r in layers], width=0.8, label="layer output SQNR")
    weight = [-10 * math.log10(r["weight_error"]) if r["weight_error"] > 0 else np.nan for r in layers]
    ax.plot(x, weight, "k.-", lw=1, ms=5, label="weight SQNR  (-10 log10 |W-Q|²/|W|²)")
    ax.set_ylabel("SQNR (dB)")
    values = [v for v in out + weight if math.isfinite(v)]
    ax.set_ylim(min(values + [0.0]) * 1.1, 1.2 * max(values + [1.0]))
    _layer_axis(ax, layers)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    samples = layers[0].get("samples") or 0
    return _section("sqnr", "Per-layer SQNR", _png(fig),
                    f"Bars: each layer's output in the quantized model against the float model on {samples} samples "
                    "(errors of earlier layers included). Line: the layer's own weight error.")


def _sensitivity(context: dict, figure: type) -> str:
    sens = context.get("sensitivity")
    if not sens:
        return ("<section id=\"sensitivity\"><h2>CLADO sensitivity</h2><p class=\"note\">Not available: the "
                "sensitivity matrix is measured by <code>onnxq quantize</code> with a budget (e.g. --avg-bits 3)."
                "</p></section>")
    from matplotlib.colors import SymLogNorm

    omega, keys = np.asarray(sens["omega"], dtype=float), [tuple(k) for k in sens["keys"]]
    size = min(9.0, 4.0 + 0.04 * len(keys))
    fig = figure(figsize=(size + 1.4, size), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    scale = float(np.abs(omega).max()) or 1.0
    image = ax.imshow(omega, cmap="RdBu_r", norm=SymLogNorm(scale * 1e-3, vmin=-scale, vmax=scale),
                      interpolation="nearest")  # three decades: entries under 0.1 % of the largest fade to white
    fig.colorbar(image, ax=ax, shrink=0.8, label="Ω (loss increase, symmetric log scale)",
                 ticks=_symlog_ticks(scale * 1e-3, scale))
    names = list(dict.fromkeys(k[0] for k in keys))
    starts = [next(i for i, k in enumerate(keys) if k[0] == n) for n in names]
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="#888", lw=0.3)
        ax.axvline(s - 0.5, color="#888", lw=0.3)
    chosen = [i for i, k in enumerate(keys) if sens.get("chosen", {}).get(k[0]) == k[1]]
    ax.plot(chosen, chosen, "o", ms=4, mfc="none", mec="k")
    ends = starts[1:] + [len(keys)]
    step = max(1, len(names) // 30)
    centres = [(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)]
    ax.set_xticks(centres[::step], [str(i) for i in range(len(names))][::step], fontsize=7)
    ax.set_yticks(centres[::step], [str(i) for i in range(len(names))][::step], fontsize=7)
    ax.set_xlabel("layer (candidate widths within each block, low to high)")
    return _section("sensitivity", "CLADO sensitivity matrix", _png(fig),
                    "Ω over (layer, width) candidates: the diagonal is each candidate's own loss increase, "
                    "off-diagonal blocks are the interactions between layers. Circles mark the chosen widths.")


def _curve(context: dict, figure: type) -> str:
    points = context.get("curve") or []
    if len(points) < 2:
        return ("<section id=\"curve\"><h2>Accuracy against size</h2><p class=\"note\">One point only; "
                "<code>onnxq sweep</code> quantizes several budgets and widths and plots the trade-off.</p>"
                "</section>")
    metric = "top1" if all(p.get("top1") is not None for p in points) else "agreement"
    fig, ax = _axes(figure, 3.6)
    series = list(dict.fromkeys(p.get("series", "budgets") for p in points))
    for index, (name, marker) in enumerate(zip(series, "os^Dv", strict=False)):
        chosen = sorted((p for p in points if p.get("series", "budgets") == name), key=lambda p: p["size_bytes"])
        xs, ys = [p["size_bytes"] / 1e6 for p in chosen], [p[metric] for p in chosen]
        ax.plot(xs, ys, marker=marker, lw=1.5, label=name)
        for p, xv, yv in zip(chosen, xs, ys, strict=True):
            if p.get("label"):
                ax.annotate(p["label"], (xv, yv), textcoords="offset points", fontsize=7,
                            xytext=(4, 6) if index == 0 else (4, -12))  # first series above, others below
    reference = (context.get("eval") or {}).get("reference_top1") if metric == "top1" else 100.0
    if reference is not None:
        ax.axhline(reference, color="#555", ls="--", lw=1, label="float model")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("top-1 (%)" if metric == "top1" else "top-1 agreement with float (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _section("curve", "Accuracy against size", _png(fig), "Each point is one quantized model.")


def _table(context: dict) -> str:
    head = ("#", "layer", "op", "shape", "bits", "output SQNR (dB)", "weight error", "Gram-weighted error",
            "size share", "sensitivity")
    rows = []
    for i, r in enumerate(context["layers"]):
        bits = f"{r['bits']}" + (f" (INT{r['stored_bits']})" if r["stored_bits"] != r["bits"] else "")
        cells = [str(i), html.escape(r["name"]), html.escape(r["op_type"]), "x".join(map(str, r["shape"])),
                 f"<span class=\"bits\" style=\"background:{_colour(r['bits'])}\">{bits}</span>",
                 _num(r.get("output_sqnr_db"), 2), _num(r["weight_error"], 3, "e"), _num(r.get("gram_error"), 3, "e"),
                 _num(None if r.get("size_share") is None else 100 * r["size_share"], 2) + " %",
                 _num(r.get("sensitivity"), 3, "e")]
        rows.append("<tr>" + "".join(f"<td{' class=l' if j in (1, 2) else ''}>{c}</td>" for j, c in enumerate(cells))
                    + "</tr>")
    header = "".join(f"<th{' class=l' if j in (1, 2) else ''}>{h}</th>" for j, h in enumerate(head))
    note = ("<p class=\"note\">Weight error: |W−Q|²/|W|² of the stored codes; Gram-weighted: "
            "tr((W−Q)H(W−Q)ᵀ)/tr(WHWᵀ) when calibration statistics were given; size share: the layer's codes as a "
            "share of the quantized file; sensitivity: CLADO's Ω diagonal at the chosen width.</p>")
    return (f"<section id=\"layers\"><h2>Per-layer table</h2>{note}<table><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>")


# ---- helpers -------------------------------------------------------------------------------------------


def _axes(figure: type, height: float) -> tuple:
    fig = figure(figsize=(10, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _layer_axis(ax: object, layers: list[dict]) -> None:
    """Layer names under the bars when they fit, else every n-th layer index."""
    x = np.arange(len(layers))
    if len(layers) <= 40:
        ax.set_xticks(x, [_short(r["name"]) for r in layers], rotation=60, ha="right", fontsize=7)
    else:
        step = max(1, len(layers) // 40)
        ax.set_xticks(x[::step], [str(i) for i in x[::step]], fontsize=7)
        ax.set_xlabel("layer index")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def _bit_legend(ax: object, layers: list[dict]) -> None:
    from matplotlib.patches import Patch

    widths = sorted({r["bits"] for r in layers})
    ax.legend([Patch(color=_colour(b)) for b in widths], [f"{b}-bit" for b in widths], loc="upper right",
              fontsize=8, ncols=len(widths), frameon=False)
    ax.set_ylim(0, max(widths) * 1.25)


def _png(fig: object) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _section(key: str, title: str, image: str, caption: str) -> str:
    return (f"<section id=\"{key}\"><h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"{image}\">"
            f"<p class=\"note\">{html.escape(caption)}</p></section>")


def _cards(items: list[tuple[str, str]]) -> str:
    return "<div class=\"cards\">" + "".join(
        f"<div class=\"card\"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>" for v, k in items) + "</div>"


def _symlog_ticks(threshold: float, scale: float) -> list[float]:
    """Zero and the powers of ten above the linear band, both signs (the band itself gets no tick)."""
    powers = [10.0**k for k in range(math.floor(math.log10(threshold)) + 1, math.floor(math.log10(scale)) + 1)]
    return [-p for p in reversed(powers)] + [0.0] + powers


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _colour(bits: int) -> str:
    return BIT_COLOURS.get(bits, "#7f7f7f")


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-width + 1:]


def _num(value: float | None, digits: int, kind: str = "f") -> str:
    """A number for the page: fixed, scientific or general notation; "–" when missing, "∞" when infinite."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}{kind}}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"


def _plain(value: object) -> object:
    """JSON-ready: numpy to Python, tuples to lists, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_reports(quantized: str | Path, reference: str | Path, data: Path, html_path: Path | None = None,
                  json_path: Path | None = None, *, evaluation: dict | None = None, plan: MixedPlan | None = None,
                  curve: list[dict] | None = None, grams: dict | None = None, preprocessing: object = None,
                  samples: int = 16, **page: str) -> dict:
    """Per-layer diagnostics on ``samples`` of ``data``, then the HTML page and/or the JSON of one quantized model;
    ``page`` overrides the context's text (title, description, ...). Returns the context."""
    layers = diagnostics_on_data(quantized, reference, data, preprocessing, samples, grams=grams, plan=plan)
    context = {**report_context(quantized, reference, layers, evaluation, plan, curve), **page}
    for path, write in ((html_path, write_report), (json_path, write_report_json)):
        if path is not None:
            write(path, context)
    return context
