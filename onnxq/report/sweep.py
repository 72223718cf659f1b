"""``onnxq sweep``: the accuracy-against-size curve of one model over several budgets and uniform widths.

One calibration (``--stats``) and one sensitivity measurement (``--sensitivity-cache``) serve every point: the
first run computes and stores them in the output folder, the others reuse them (a rerun of the sweep reuses them
too). Each point is scored on ``data`` when given (top-1 with labels, else agreement, KL and SQNR against the
float model), otherwise on the held-out check of its own run. Points no other point beats on both size and
accuracy form the Pareto front. Writes the models, ``sweep.json``, ``sweep.md`` and, with matplotlib, the HTML
report (CLADO's sensitivity heat map and the curve) of the budget point on the front with the most accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxq.config import Config, MixedPrecision
from onnxq.data.images import ImagePreprocessing
from onnxq.errors import OnnxqError

BUDGET_SERIES = "CLADO mixed precision"
UNIFORM_SERIES = "uniform width"


@dataclass
class SweepPoint:
    """One model of the sweep: how big it is and how close to the float model."""

    series: str
    label: str
    path: Path
    size_bytes: int
    avg_bits: float
    stored_bits: float
    agreement: float | None = None
    kl: float | None = None
    sqnr_db: float | None = None
    top1: float | None = None
    pareto: bool = False

    def score(self) -> tuple[float, float]:
        """Higher is better: top-1 when labels are known, else agreement with the float model; ties (few samples
        give coarse agreement) are broken by the output SQNR."""
        primary = next((v for v in (self.top1, self.agreement) if v is not None), float("-inf"))
        return primary, self.sqnr_db if self.sqnr_db is not None else float("-inf")

    def as_curve(self) -> dict:
        """A point of the report's curve (top-1 when known, else agreement)."""
        accuracy = {"top1": self.top1} if self.top1 is not None else {"agreement": self.agreement}
        return {"series": self.series, "label": self.label, "size_bytes": self.size_bytes,
                "avg_bits": self.stored_bits, **accuracy}


@dataclass
class Sweep:
    points: list[SweepPoint]
    plans: dict[str, object] = field(default_factory=dict)  # budget label -> its MixedPlan (Omega, widths)


def point_configs(config: Config, folder: Path, budgets: tuple[float, ...], widths: tuple[int, ...]
                  ) -> list[tuple[str, str, Config]]:
    """(series, label, config) per point; every point shares one statistics file and one sensitivity cache."""
    if config.mixed is not None and any(v is not None for v in (config.mixed.size_mb, config.mixed.size_ratio)):
        raise OnnxqError("onnxq sweep sets the budgets itself: drop --size-mb/--size-ratio and list budgets "
                         "with --budgets")
    stats = config.data.stats or folder / "statistics.npz"
    data = dataclasses.replace(config.data, stats=stats)
    mixed = config.mixed or MixedPrecision()
    cache = mixed.sensitivity_cache or folder / "sensitivity.npz"
    points = []
    for width in widths:
        uniform_data = config.data if config.rounding.sequential else data  # sequential uniform reads no stats
        layers = dataclasses.replace(config.layers, bits=width)
        points.append((UNIFORM_SERIES, f"{width}-bit", dataclasses.replace(config, layers=layers, mixed=None,
                                                                          data=uniform_data)))
    for budget in budgets:
        budgeted = dataclasses.replace(mixed, avg_bits=budget, size_mb=None, size_ratio=None,
                                       sensitivity_cache=cache)
        points.append((BUDGET_SERIES, f"{budget:g} bits", dataclasses.replace(config, mixed=budgeted, data=data)))
    return points


def run_sweep(model: Path, calib: object, folder: Path, config: Config, budgets: tuple[float, ...],
              widths: tuple[int, ...], data: Path | None = None, labels: Path | None = None,
              limit: int | None = None, progress: Callable | None = None,
              echo: Callable[[str], None] = lambda line: None) -> Sweep:
    """Quantize ``model`` once per budget and width into ``folder`` and score every point."""
    from onnxq.api import quantize
    from onnxq.report.evaluate import evaluate

    if not budgets and not widths:
        raise OnnxqError("onnxq sweep needs at least one point: give --budgets and/or --widths")
    folder.mkdir(parents=True, exist_ok=True)
    sweep = Sweep([])
    for series, label, point_config in point_configs(config, folder, budgets, widths):
        path = folder / f"{Path(model).stem}_{label.replace(' ', '_').replace('-', '_')}.onnx"
        result = quantize(model, calib, path, point_config, progress=progress)
        agreement = None if result.top1_agreement is None else 100 * result.top1_agreement  # percent, as eval
        point = SweepPoint(series, label, path, result.output_bytes, result.average_bits(stored=False),
                           result.average_bits(stored=True), agreement=agreement, sqnr_db=result.output_sqnr_db)
        if data is not None:
            scored = evaluate(path, Path(model), data, config.data.preprocessing, labels, limit=limit)
            point.agreement, point.kl, point.sqnr_db, point.top1 = (scored.agreement, scored.mean_kl,
                                                                     scored.sqnr_db, scored.top1)
        if result.mixed is not None:
            sweep.plans[label] = result.mixed
        sweep.points.append(point)
        echo(f"{label}: {point.size_bytes / 1e6:.3f} MB, {point.stored_bits:.2f} stored bits, " + score_text(point))
    mark_pareto(sweep.points)
    return sweep


def score_text(point: SweepPoint) -> str:
    parts = []
    if point.top1 is not None:
        parts.append(f"top-1 {point.top1:.2f} %")
    if point.agreement is not None:
        parts.append(f"agreement {point.agreement:.1f} %")
    if point.kl is not None:
        parts.append(f"KL {point.kl:.4f}")
    if point.sqnr_db is not None:
        parts.append(f"SQNR {point.sqnr_db:.1f} dB")
    return ", ".join(parts) or "no score"


def mark_pareto(points: list[SweepPoint]) -> None:
    """A point is on the front when no other point is at most as big and strictly better, or smaller and as
    good."""
    for point in points:
        point.pareto = not any(
            (other.size_bytes <= point.size_bytes and other.score() > point.score())
            or (other.size_bytes < point.size_bytes and other.score() >= point.score())
            for other in points if other is not point)


def sweep_table(points: list[SweepPoint]) -> str:
    """The points as a markdown table, smallest first; ``*`` marks the Pareto front."""
    lines = ["| point | size MB | avg bits (stored) | top-1 % | agreement % | KL | SQNR dB | front |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p.size_bytes):
        lines.append(f"| {p.label} ({p.series}) | {p.size_bytes / 1e6:.3f} | {p.avg_bits:.2f} ({p.stored_bits:.2f}) | "
                     f"{_cell(p.top1, 2)} | {_cell(p.agreement, 1)} | {_cell(p.kl, 4)} | {_cell(p.sqnr_db, 1)} | "
                     f"{'*' if p.pareto else ''} |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def featured(sweep: Sweep) -> SweepPoint:
    """The point the HTML report explains: the most accurate budget point on the front (its sensitivity heat map
    is CLADO's), else the most accurate point."""
    budgets = [p for p in sweep.points if p.label in sweep.plans and p.pareto] or \
        [p for p in sweep.points if p.label in sweep.plans] or sweep.points
    return max(budgets, key=SweepPoint.score)


def write_sweep(folder: Path, sweep: Sweep, model: Path, report_data: Path,
                preprocessing: ImagePreprocessing | None, diagnostic_samples: int = 16) -> list[Path]:
    """sweep.json, sweep.md and (with matplotlib) report.html / report.json in ``folder``; returns the files."""
    from onnxq.export.atomic import write_text

    written = [folder / "sweep.json", folder / "sweep.md"]
    rows = [{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(p).items()} for p in sweep.points]
    write_text(written[0], json.dumps({"model": str(model), "points": rows}, indent=1), "sweep")
    write_text(written[1], sweep_table(sweep.points), "sweep")
    try:
        from onnxq.report.html_report import require_matplotlib
        require_matplotlib()
    except OnnxqError:
        return written
    from onnxq.report.html_report import write_reports

    point = featured(sweep)
    evaluation = {"agreement": point.agreement, "mean_kl": point.kl, "sqnr_db": point.sqnr_db, "top1": point.top1}
    description = (f"onnxq sweep: {len(sweep.points)} points (the table below the curve lists them); this page "
                   f"explains the {point.label} model, the most accurate budget on the Pareto front.")
    write_reports(point.path, model, report_data, folder / "report.html", folder / "report.json",
                  evaluation=evaluation, plan=sweep.plans.get(point.label), curve=[p.as_curve() for p in sweep.points],
                  preprocessing=preprocessing, samples=diagnostic_samples, description=description)
    return [*written, folder / "report.html", folder / "report.json"]
