"""How much a result depends on which calibration images were drawn: K disjoint calibration sets.

Subset k is every K-th image of the sorted imagenet-calib1000 listing starting at image k (K = 4: 250 images
each; the listing holds one image per class, so the subsets share no class), linked into a temporary folder.
For each subset: COMQ weight-only, first and last layer at 8 bits, default (float-input statistics) and
``--sequential``; top-1 and mean KL to FP32 on all of imagenet-val1300, then the mean and standard deviation.
One top-1 on 1300 images moves by several images when a few codes flip, so a gap below ~0.5 point between two
single runs says little; the mean over disjoint calibration sets does. Writes bench/results/<tag>.{json,md}.

    python bench/calib_subsets.py [--models efficientnet_lite0] [--bits 4] [--subsets 4]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np
from common import CALIB, logits, model_path, require_shared, save_results, val_set
from sequential import run_one


def subset_folder(root: Path, k: int, count: int) -> Path:
    """A folder of symbolic links to every ``count``-th calibration image starting at image ``k``."""
    folder = root / f"subset{k}"
    folder.mkdir()
    for file in sorted(CALIB.iterdir())[k::count]:
        (folder / file.name).symlink_to(file)
    return folder


def markdown(rows: list[dict], fp32: dict[str, float]) -> str:
    out = ["| model (FP32 top-1) | weights | mode | top-1 per subset | top-1 mean ± sd | KL mean ± sd |",
           "|---|---|---|---|---|---|"]
    for name in fp32:
        for bits in sorted({r["bits"] for r in rows if r["model"] == name}, reverse=True):
            for sequential in (False, True):
                hits = [r for r in rows if (r["model"], r["bits"], r["sequential"]) == (name, bits, sequential)]
                top1, kl = np.array([r["top1"] for r in hits]), np.array([r["kl"] for r in hits])
                out.append(f"| {name} ({fp32[name]:.2f}) | W{bits} (first/last 8) | "
                           f"{'sequential' if sequential else 'default'} | "
                           f"{' / '.join(f'{t:.2f}' for t in top1)} | {top1.mean():.2f} ± {top1.std(ddof=1):.2f} | "
                           f"{kl.mean():.4f} ± {kl.std(ddof=1):.4f} |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--models", default="efficientnet_lite0")
@click.option("--bits", default="4")
@click.option("--subsets", default=4, show_default=True, help="Disjoint calibration sets (every K-th image).")
@click.option("--tag", default="calib_subsets", help="Name of the result files.")
def main(models: str, bits: str, subsets: int, tag: str) -> None:
    require_shared()
    rows, fp32 = [], {}
    with tempfile.TemporaryDirectory() as root:
        folders = [subset_folder(Path(root), k, subsets) for k in range(subsets)]
        for name in models.split(","):
            x, y = val_set(name)
            reference = logits(model_path(name), x)
            fp32[name] = float((reference.argmax(1) == y).mean() * 100)
            for b in map(int, bits.split(",")):
                for sequential in (False, True):
                    for folder in folders:
                        rows.append({**run_one(name, b, sequential, None, x, y, reference, folder, 0),
                                     "subset": folder.name})
                        click.echo(json.dumps(rows[-1]), err=True)
    table = markdown(rows, fp32)
    save_results(tag, fp32, rows, table)
    click.echo(table)


if __name__ == "__main__":
    main()
