"""The region table and plot of `lmscore surprisal` (lmscore.client.surprisal), made from its
words TSV: one row per item, condition and region, and the mean region surprisal by
condition with one standard error over items. matplotlib is imported only to plot."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass
class Region:
    item: str
    condition: str
    region: int
    words: list[str]
    # Sums over the region's words; None when a word has no surprisal (nothing before it).
    surprisal: float | None
    surprisal_uncorrected: float | None
    entropy_before: float | None  # at the region's first word


def _number(cell: str) -> float | None:
    return float(cell) if cell else None


def _add(total: float | None, cell: str) -> float | None:
    return None if total is None or not cell else total + float(cell)


def region_rows(words_path: Path, units: str) -> list[Region]:
    """The regions of the words TSV, in its order."""
    regions: dict[tuple[str, str, int], Region] = {}
    with words_path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            key = (row["item"], row["condition"], int(row["region"]))
            surprisal = row[f"surprisal_{units}"]
            uncorrected = row[f"surprisal_uncorrected_{units}"]
            if key not in regions:
                regions[key] = Region(
                    *key,
                    words=[],
                    surprisal=0.0,
                    surprisal_uncorrected=0.0,
                    entropy_before=_number(row[f"entropy_{units}"]),
                )
            region = regions[key]
            region.words.append(row["word"])
            region.surprisal = _add(region.surprisal, surprisal)
            region.surprisal_uncorrected = _add(region.surprisal_uncorrected, uncorrected)
    return list(regions.values())


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_regions(path: Path, regions: Sequence[Region], units: str) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(
            [
                "item",
                "condition",
                "region",
                "words",
                "text",
                f"surprisal_{units}",
                f"surprisal_uncorrected_{units}",
                f"entropy_before_{units}",
            ]
        )
        for r in regions:
            writer.writerow(
                [
                    r.item,
                    r.condition,
                    r.region,
                    len(r.words),
                    " ".join(r.words),
                    _cell(r.surprisal),
                    _cell(r.surprisal_uncorrected),
                    _cell(r.entropy_before),
                ]
            )


@dataclasses.dataclass(frozen=True)
class RegionMean:
    condition: str
    region: int
    mean: float
    standard_error: float  # over items; nan for a single item
    items: int


def region_means(regions: Sequence[Region]) -> list[RegionMean]:
    """Per condition and region, the mean surprisal over the items that have one, and its
    standard error (sample standard deviation / sqrt(items))."""
    values: dict[tuple[str, int], list[float]] = {}
    for r in regions:
        if r.surprisal is not None:
            values.setdefault((r.condition, r.region), []).append(r.surprisal)
    means = []
    for (condition, region), sums in values.items():
        error = statistics.stdev(sums) / math.sqrt(len(sums)) if len(sums) > 1 else math.nan
        means.append(RegionMean(condition, region, statistics.fmean(sums), error, len(sums)))
    return sorted(means, key=lambda m: (m.condition, m.region))


def write_plot(path: Path, regions: Sequence[Region], units: str, title: str) -> None:
    """The mean region surprisal by condition, with error bars of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = region_means(regions)
    conditions = list(dict.fromkeys(r.condition for r in regions))  # in input order
    items = len({r.item for r in regions})
    figure, axis = plt.subplots(figsize=(7, 4))
    for number, condition in enumerate(conditions):
        points = [m for m in means if m.condition == condition]
        # Conditions side by side around each region, so that their error bars do not hide
        # one another.
        dodge = 0.06 * (number - (len(conditions) - 1) / 2)
        axis.errorbar(
            [m.region + dodge for m in points],
            [m.mean for m in points],
            yerr=[0.0 if math.isnan(m.standard_error) else m.standard_error for m in points],
            marker="o",
            capsize=4,
            label=condition or "(no condition)",
        )
        for m in (m for m in points if m.items < items):  # a region some items lack
            axis.annotate(
                f"n={m.items}",
                (m.region + dodge, m.mean),
                textcoords="offset points",
                xytext=(6, -3),
                fontsize=7,
            )
    axis.set_xticks(sorted({m.region for m in means}))
    axis.set_xlabel("region")
    axis.set_ylabel(f"surprisal ({units}), summed over the region")
    axis.set_title(f"{title}: mean over {items} items, ± 1 standard error", fontsize=10)
    left_out = sorted({r.region for r in regions} - {m.region for m in means})
    if left_out:
        # Their sums are empty: a word without surprisal (a first word with nothing before).
        figure.text(
            0.01,
            0.01,
            f"left out, a word without surprisal in every item: region "
            f"{', '.join(map(str, left_out))}",
            fontsize=7,
        )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
