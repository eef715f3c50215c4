"""The Table-1 row of a pipeline run (`pipeline.py`) from its evaluation results: `<workdir>/table.json` and
`table.md`, one row per method with mean ± sample std (ddof 1) over training seeds of each run's figures
(a run's own figure being the mean over its sampling seeds): Rouge-L per set, reverse KL to the teacher per
token, Dist-4, LM loss on the gold answers, ExAccErr for the runs that measured it; the per-seed values, and
the wall and CPU time of every stage from `pipeline.json`. The teacher, trained once, is spread over its sampling
seeds only."""

from __future__ import annotations

import json
import pathlib

from minillm_jax.eval_metrics import mean_std
from minillm_jax.workdir import atomic_write_json, atomic_write_text

SET_NAMES = {"dolly": "Dolly", "self_inst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI"}
ROWS = ("teacher", "sft_init", "sft", "kd", "seqkd", "minillm")
# (key in table.json, heading, per-set key in results.json, digits)
METRICS = (("rouge_l", "Rouge-L", "rouge_l_mean", 2),
           ("reverse_kl_per_token", "Reverse KL to the teacher per token (the student's own samples)",
            "reverse_kl_per_token", 3),
           ("dist_4", "Dist-4 (distinct 4-grams of each answer, x 100)", "dist_4_mean", 2),
           ("lm_loss", "LM loss on the gold answers (first reference; mean over answers of the token mean)",
            "lm_loss", 3),
           ("length", "Mean answer length (generated tokens)", "length_mean", 1))


def _sets(model_results: dict) -> dict:
    return {k: v for k, v in model_results.items() if isinstance(v, dict) and "rouge_l_mean" in v}


def collect(stages) -> tuple[dict, list[str]]:
    """{method: {set: {metric: {label: value}}}} plus "exacc_err": {method: {length: {label: value}}}, and the
    set names in order, from the results.json of every finished evaluation stage."""
    values, order = {}, []
    for stage in stages:
        if stage.kind != "eval" or not stage.done():
            continue
        results = json.loads(stage.output.read_text())
        role = "teacher" if stage.method == "teacher" else "student"
        sets = _sets(results.get(role, {}))
        for name, r in sets.items():
            if name not in order:
                order.append(name)
            cell = values.setdefault(stage.method, {}).setdefault(name, {})
            if role == "teacher":  # one run: the spread is over its sampling seeds
                for seed, per_seed in r["per_seed"].items():
                    cell.setdefault("rouge_l", {})[f"sample {seed}"] = per_seed["rouge_l"]
                    if per_seed.get("dist_4") is not None:
                        cell.setdefault("dist_4", {})[f"sample {seed}"] = per_seed["dist_4"]
                for key, _, source, _ in METRICS:
                    if key not in ("rouge_l", "dist_4") and r.get(source) is not None:
                        cell.setdefault(key, {})["run"] = r[source]
                continue
            for key, _, source, _ in METRICS:
                if r.get(source) is not None:
                    cell.setdefault(key, {})[f"seed {stage.seed}"] = r[source]
        exposure = results.get(role, {}).get("exposure_bias")
        if exposure:
            cell = values.setdefault("exacc_err", {}).setdefault(stage.method, {})
            for length, point in exposure["summary"].items():
                if point["exacc_err"] is not None:
                    cell.setdefault(length, {})[f"seed {stage.seed}"] = point["exacc_err"]
    return values, order


def summarise(values: dict) -> dict:
    """Every {label: value} leaf of `collect` as {"mean", "std", "n", "values"}."""
    def leaf(node):
        if node and all(isinstance(v, (int, float)) for v in node.values()):
            mean, std = mean_std(list(node.values()))
            return {"mean": mean, "std": std, "n": len(node), "values": node}
        return {k: leaf(v) for k, v in node.items()}

    return leaf(values)


def _cell(stat: dict | None, digits: int) -> str:
    if not stat:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def render(summary: dict, sets: list[str], seeds, wall: dict) -> str:
    rows = [m for m in ROWS if m in summary] + [m for m in summary if m not in ROWS and m != "exacc_err"]
    heads = [SET_NAMES.get(s, s) for s in sets]
    lines = [f"# Table-1 row: mean ± std over training seeds {', '.join(map(str, seeds))} (sample std, ddof 1; "
             "the teacher's over its sampling seeds)", ""]
    for key, heading, _, digits in METRICS:
        if not any(key in summary[m].get(s, {}) for m in rows for s in sets):
            continue
        lines += [f"## {heading}", "", "| method | " + " | ".join(heads) + " |", "|---" * (len(sets) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_cell(summary[m].get(s, {}).get(key), digits) for s in sets) + " |"
                  for m in rows]
        lines.append("")
    exacc = summary.get("exacc_err", {})
    if exacc:
        lengths = sorted({int(n) for m in exacc.values() for n in m})
        lines += [f"## Exposure bias: ExAccErr(l) in % on the {SET_NAMES.get(sets[0], sets[0])} prompts",
                  "", "| method | " + " | ".join(f"l={n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_cell(exacc[m].get(str(n)), 1) for n in lengths) + " |" for m in exacc]
        lines.append("")
    lines += ["## Rouge-L per seed", "", "| method | seed | " + " | ".join(heads) + " |",
              "|---" * (len(sets) + 2) + "|"]
    for m in rows:
        labels = sorted({label for s in sets for label in summary[m].get(s, {}).get("rouge_l", {}).get("values", {})})
        for label in labels:
            cells = [summary[m].get(s, {}).get("rouge_l", {}).get("values", {}).get(label) for s in sets]
            lines.append(f"| {m} | {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in cells) + " |")
    lines.append("")
    if wall:
        lines += ["## Time per stage (all sittings)", "", "| stage | wall minutes | CPU minutes | status |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {w['seconds'] / 60:.1f} | {w.get('cpu_seconds', 0) / 60:.1f} | {w['status']} |"
                  for name, w in wall.items()]
        lines += [f"| total | {sum(w['seconds'] for w in wall.values()) / 60:.1f} | "
                  f"{sum(w.get('cpu_seconds', 0) for w in wall.values()) / 60:.1f} | |", ""]
    return "\n".join(lines)


def write_table(root: pathlib.Path, seeds, stages) -> pathlib.Path | None:
    """Write table.json and table.md from the finished evaluations; None when there is none yet."""
    values, sets = collect(stages)
    if not sets:
        return None
    record = root / "pipeline.json"
    wall = json.loads(record.read_text())["stages"] if record.exists() else {}
    summary = summarise(values)
    atomic_write_json(root / "table.json", {"seeds": list(seeds), "sets": sets, "methods": {
        m: v for m, v in summary.items() if m != "exacc_err"}, "exacc_err": summary.get("exacc_err", {}),
        "wall_seconds": {name: w["seconds"] for name, w in wall.items()},
        "cpu_seconds": {name: w.get("cpu_seconds") for name, w in wall.items()}})
    path = root / "table.md"
    atomic_write_text(path, render(summary, sets, seeds, wall))
    return path


__all__ = ["collect", "render", "summarise", "write_table"]
