"""Which heads each RestoreLCC row of the recovery benchmark compensated, beside what it recovered.

The probe's choice, lost_norm's, the random draws and the per-layer spread are compared by the heads they share with
the probe's choice and by where in the depth they lie (heads in each third of the layers), next to each row's held-out
perplexity, share of the log-perplexity gap and average accuracy from the results file. Needs no model: the lost
components cached by a run of ``benchmarks/recovery.py`` carry the probe's scores, and the other selections are
recomputed from them.

    python benchmarks/head_choice.py        # after benchmarks/recovery.py, from its cache and results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# A script's own folder is first on sys.path: the sibling recovery benchmark, with its head selections.
import recovery as recovery_benchmark

from peft_restorelcc.calibration import LostComponents

BENCHMARKS = Path(__file__).parent


def selections(components: LostComponents, share: float, names: list[str]) -> dict[str, dict[int, list[int]]]:
    """The heads each row of ``names`` compensates at ``share`` of the heads, as the recovery benchmark chooses them."""
    return {name: recovery_benchmark.chosen_heads(components, name, share) for name in names}


def row_names() -> list[str]:
    """The RestoreLCC rows on the probe's top heads and on every other head selection: those trained as the
    benchmark's flags say first (``restorelcc``, the reference, leading), then those with a recipe of their own (the
    paper's), side by side."""
    names = [*recovery_benchmark.PROBE_TOP_ROWS, *recovery_benchmark.HEAD_SELECTIONS]
    own_recipe = [name for name in names if name in recovery_benchmark.RECIPE_OVERRIDES]
    return [name for name in names if name not in own_recipe] + own_recipe


def describe(heads: dict[int, list[int]], reference: dict[int, list[int]], num_layers: int) -> dict[str, Any]:
    """How many heads ``heads`` shares with ``reference``, how many layers it touches and how many heads it puts in
    each third of the ``num_layers`` layers (lower, middle, upper)."""
    pairs = {(layer, head) for layer, indices in heads.items() for head in indices}
    reference_pairs = {(layer, head) for layer, indices in reference.items() for head in indices}
    thirds = [0, 0, 0]
    for layer, _ in pairs:
        thirds[min(2, 3 * layer // num_layers)] += 1
    return {"heads": len(pairs), "shared": len(pairs & reference_pairs), "layers": len(heads), "thirds": thirds}


def table(
    chosen: dict[str, dict[int, list[int]]], num_layers: int, num_heads: int, rows: dict[str, dict[str, Any]]
) -> str:
    reference = chosen["restorelcc"]
    expected = round(sum(map(len, reference.values())) ** 2 / num_heads)
    lines = [
        f"| row | heads | shared with the probe's (chance: {expected}) | layers touched (of {num_layers}) "
        "| heads in lower / middle / upper third | held-out ppl | gap recovered (log ppl) | avg acc | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, heads in chosen.items():
        facts, row = describe(heads, reference, num_layers), rows.get(name, {})
        ppl = f"{row['ppl']:.2f}" + (f" ± {row['ppl_std']:.2f}" if row.get("ppl_std") else "") if row else "not run"
        gap = f"{row['gap_recovered_ppl']:.0%}" if row else ""
        accuracy = f"{row['avg_acc']:.3f}" if row else ""
        lines.append(
            f"| {name} | {facts['heads']} | {facts['shared']} | {facts['layers']} | "
            + " / ".join(map(str, facts["thirds"]))
            + f" | {ppl} | {gap} | {accuracy} | {','.join(map(str, row.get('seeds', [])))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / "recovery.json")
    parser.add_argument(
        "--components",
        type=Path,
        default=None,
        help="lost_components folder (default: the one cached beside --results, if there is exactly one)",
    )
    args = parser.parse_args()
    if not args.results.is_file():
        parser.error(f"no results file at {args.results}; run benchmarks/recovery.py first or pass --results")
    report = json.loads(args.results.read_text())
    folder = args.components
    if folder is None:
        cached = sorted((args.results.parent / "recovery-work" / "cache").glob("*/lost_components"))
        if len(cached) != 1:
            parser.error(
                f"found {len(cached)} cached lost_components beside {args.results}; pass --components DIR "
                "(a benchmarks/results/recovery-work/cache/*/lost_components folder)"
            )
        folder = cached[0]
    if not (folder / "lost_components.safetensors").is_file():
        parser.error(f"--components: no lost_components.safetensors in {folder}; give a folder that calibration wrote")
    components = LostComponents.load(folder)
    share = report["settings"]["heads"]
    chosen = selections(components, share, row_names())
    rows = {row["method"]: row for row in report["rows"]}
    print(f"{share:.0%} of {components.num_heads} heads, components from {folder}\n")
    print(table(chosen, max(components.layer_indices) + 1, components.num_heads, rows))


if __name__ == "__main__":
    main()
