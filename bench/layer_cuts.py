"""Which of SmolLM2-135M-Instruct's 30 layers a layer-cut student should keep: greedy Rouge-L of the cut
model's answers against the full model's greedy answers, at initialisation (no training), on the demo's
held-out prompts.

    python bench/layer_cuts.py                       # the cuts in bench/RESULTS.md
    python bench/layer_cuts.py "[[0, 1, 2], list(range(20, 30))]"   # others (Python lists of layer indices)
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.common import smollm2_teacher  # noqa: E402
from configs.demo import DEMO_DATA  # noqa: E402
from minillm_jax.data.instructions import FieldMap, read_records  # noqa: E402
from minillm_jax.eval_metrics import rouge_l  # noqa: E402
from minillm_jax.models import load_pretrained, load_tokenizer, select_layers  # noqa: E402
from minillm_jax.sampling import SamplingConfig, generate  # noqa: E402
from minillm_jax.validation import prompt_ids  # noqa: E402

CUTS = [
    list(np.linspace(0, 29, n).round().astype(int)) for n in (10, 15, 20, 24, 27)  # spread evenly
] + [
    [0, 1] + list(range(22, 30)),  # 10: first 2, last 8
    [0, 1, 2, 3] + list(range(20, 30)),  # 14
    [0, 1, 2] + list(range(17, 30)),  # 16
    list(range(8)) + list(range(20, 30)),  # 18
    list(range(14)) + list(range(26, 30)),  # 18: mostly early layers
    list(range(6)) + list(range(14, 30)),  # 22
    list(range(18)) + [28, 29],  # 20
    list(range(22)) + [27, 28, 29],  # 25
    list(range(24)) + [29],  # 25: the late block dropped
]
PROMPTS, NEW_TOKENS = 16, 48


def main(argv: list[str]) -> None:
    cuts = eval(argv[0], {"range": range, "list": list}) if argv else CUTS  # noqa: S307 (a command-line list)
    teacher = load_pretrained(smollm2_teacher(), dtype="float32")
    tokenizer = load_tokenizer(smollm2_teacher())
    records, _ = read_records(DEMO_DATA)
    prompts = [prompt_ids(tokenizer, r, FieldMap(), template="chat", max_prompt_length=128)
               for r in records[-PROMPTS:]]  # the demo's held-out records
    config = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=0)

    def answers(model) -> list[str]:
        out = jax.tree.map(np.asarray, generate(model, prompts, config, jax.random.key(0)))
        return [tokenizer.decode(out.tokens[i, :out.lengths[i]], skip_special_tokens=True) for i in range(len(prompts))]

    reference = answers(teacher)
    print("| layers kept | count | greedy Rouge-L vs the full model | first answer |\n|---|---|---|---|")
    for layers in cuts:
        layers = [int(i) for i in layers]
        start = time.time()
        texts = answers(select_layers(teacher, layers))
        score = np.mean([rouge_l(t, [r]) for t, r in zip(texts, reference)])
        first = texts[0][:60].replace("\n", " ").replace("|", "/")
        print(f"| {layers} | {len(layers)} | {score:.1f} | {first} |  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
