"""The statistics section of a data card, rendered in Markdown from a validation dict.

``dermaclass data card PATH`` prints it; a clinic pastes it into its copy of
``data_cards/TEMPLATE.md``. Rendering only reads the plain dict that ``Validation.to_dict``
returns, so the card and ``data validate --json`` can never disagree.
"""

from __future__ import annotations

from typing import Any


def render_card(stats: dict[str, Any], *, split_counts: dict[str, dict[str, int]] | None = None) -> str:
    """Markdown statistics: classes with full names, images and groups per class, problems."""
    group = stats["group_label"]
    sizes = ", ".join("{} ({:,})".format(s["size"], s["images"]) for s in stats["sizes"]["most_common"][:3])
    modes = ", ".join(f"{m} ({n:,})" for m, n in stats["image_modes"].items())
    lines = [
        "## Statistics",
        "",
        f"- Source folder: `{stats['root']}` ({stats['layout']} layout"
        + (f", manifest `{stats['manifest'].rsplit('/', 1)[-1]}`" if stats.get("manifest") else "")
        + ")",
        f"- Images: {stats['images']:,} usable of {stats['files_checked']:,} files checked",
        f"- Classes: {stats['classes']}",
        f"- {group}: {stats['groups']:,}",
        f"- Imbalance ratio (largest / smallest class): {stats['imbalance_ratio']:g}",
        f"- Image sizes: most common {sizes}; smallest {stats['sizes']['smallest']}, largest {stats['sizes']['largest']}",
        f"- Image modes: {modes}"
        + (f"; {stats['converted_to_rgb']:,} converted to RGB" if stats["converted_to_rgb"] else ""),
        "",
        f"| code | class | images | {group} | share |",
        "|---|---|---:|---:|---:|",
    ]
    for c in stats["per_class"]:
        lines.append(
            f"| {c['label']} | {c['name']} | {c['images']:,} | {c['groups']:,} | {c['fraction'] * 100:.1f} % |"
        )
    if split_counts:
        splits = list(split_counts)
        lines += ["", "| split | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
        labels = sorted({lab for counts in split_counts.values() for lab in counts} - {"total"})
        for lab in labels + ["total"]:
            lines.append(f"| {lab} | " + " | ".join(f"{split_counts[s].get(lab, 0):,}" for s in splits) + " |")
    problems = stats["problems"]
    lines += ["", f"Problems found: {problems['total']:,} ({problems['skipped']:,} images skipped)."]
    for kind, n in problems["by_kind"].items():
        lines.append(f"- {kind}: {n:,}")
    return "\n".join(lines) + "\n"
