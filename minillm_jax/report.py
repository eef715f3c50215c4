"""What a finished training run shows: `summary.md` (validation figures before and after, and per held-out
prompt the teacher's, the initial student's and the trained student's greedy answers side by side) and
`curves.png` (the main training curves of metrics.jsonl)."""

from __future__ import annotations

import math
import pathlib

from minillm_jax import evaluate
from minillm_jax.data.instructions import FieldMap, split_messages
from minillm_jax.tracking import read_metrics
from minillm_jax.workdir import atomic_write_text

CURVES = ("loss", "valid/rouge_l", "valid/reverse_kl_per_token", "valid/loss", "rollout/seq_log_ratio", "pg",
          "single_step", "pt", "ce", "jsd", "grad_norm", "lr", "tokens_per_second")
PRINTED_PROMPTS = 3


def shown_prompt(record: dict, fields: FieldMap) -> str:
    """What the user asked, for display: the instruction (and its input), or a chat record's last prompt
    turn."""
    if fields.messages:
        return split_messages(record[fields.messages])[0][-1]["content"]
    extra = (record.get(fields.input) or "") if fields.input else ""
    return record[fields.instruction] + (f"\n\n{extra}" if extra.strip() else "")


def greedy_scores(answers: list[str], teacher_answers: list[str] | None, gold: list[list[str]]) -> dict:
    """Rouge-L of greedy answers against the teacher's greedy answers and against the gold answers."""
    scores = {"greedy/rouge_l": evaluate.score(answers, gold)["rouge_l"]}
    if teacher_answers is not None:
        scores["greedy/rouge_l_teacher"] = evaluate.score(answers, [[t] for t in teacher_answers])["rouge_l"]
    return scores


def summary(before: dict, after: dict, records: list[dict], fields: FieldMap, greedy: dict[str, list[str]],
            *, curves: bool) -> tuple[str, str]:
    """(summary.md text, the shorter printed version). `greedy` maps "teacher", "before", "after" to each
    one's greedy answers (the teacher's may be missing)."""
    keys = [k for k in after if isinstance(after[k], (int, float))]
    table = ["| metric | before | after |", "|---|---|---|"]
    for key in keys:
        old = before.get(key)
        table.append(f"| {key} | {_number(old)} | {_number(after[key])} |")
    head = ["# Run summary", "", "Validation on the held-out prompts (`valid/*`: the sampled protocol, temperature "
            "1; `greedy/*`: greedy answers), before and after training:", "", *table, ""]
    if curves:
        head += ["Training curves: ![curves](curves.png)", ""]

    def answers(limit):
        lines = []
        for i, record in enumerate(records[:limit]):
            lines += [f"**Prompt {i + 1}:** {shown_prompt(record, fields).strip()}", ""]
            for role, label in (("teacher", "teacher (greedy)"), ("before", "student before (greedy)"),
                                ("after", "student after (greedy)")):
                if greedy.get(role) is not None:
                    lines.append(f"- {label}: {_one_line(greedy[role][i])}")
            lines.append("")
        return lines

    full = "\n".join(head + ["## Greedy answers, every held-out prompt", ""] + answers(len(records)))
    printed = "\n".join(head + answers(PRINTED_PROMPTS))
    return full, printed


def write_summary(workdir: pathlib.Path, text: str) -> None:
    atomic_write_text(workdir / "summary.md", text + "\n")


def plot(workdir: pathlib.Path) -> bool:
    """curves.png from metrics.jsonl; False when nothing plottable was logged."""
    rows = read_metrics(workdir / "metrics.jsonl")
    logged = {k for row in rows for k in row}
    keys = [k for k in CURVES if k in logged]
    if not keys:
        return False
    evaluate.plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", keys=keys)
    return True


def _number(value) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.4g}"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


__all__ = ["CURVES", "greedy_scores", "plot", "shown_prompt", "summary", "write_summary"]
