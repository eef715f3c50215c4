"""The evaluation protocol: metrics against rouge_score and hand values, ECE against brute force, ExAccErr
against a float64 torch/numpy computation, the real test files, and the end-to-end report."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import build_hf_model, hf_logits
from rouge_score import rouge_scorer

from minillm_jax.data import format_prompt
from minillm_jax.eval_metrics import bucket_means, dist_n, distinct_ngrams, expected_calibration_error, mean_std
from minillm_jax.evaluate import (
    EvalSet,
    calibration,
    evaluate_model,
    exact_match,
    exposure_bias,
    generate_texts,
    gold_loss,
    load_eval_set,
    plot_curves,
    prefix_kl,
    rouge_l,
    sample_answers,
    score,
    write_report,
)
from minillm_jax.models import ModelConfig, Transformer, load_pretrained, load_tokenizer
from minillm_jax.sampling import SamplingConfig, generate

DOLLY = "dolly/test.jsonl"
SINST = "sinst/test.jsonl"
WORDS = ("the cat sat on mat dog ran fast slow big small red blue green house tree car road sun moon star water "
         "fire city river night day good bad old new happy sad yes no very one two three").split()

# ------------------------------------------------------------------------------------ fixtures


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS (+ <eos>, <unk>): random models then emit real words, so
    Rouge-L against references written in those words is informative."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def tiny_model(vocab: int, seed: int = 0) -> Transformer:
    config = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, intermediate_size=24, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return Transformer(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Two different random Llamas as (torch model, our model loaded from its checkpoint): student, teacher."""
    pair = []
    for seed in (0, 1):
        hf_model = build_hf_model("llama_gqa", seed=seed)
        path = tmp_path_factory.mktemp(f"llama{seed}")
        hf_model.save_pretrained(path)
        pair.append((hf_model, load_pretrained(path)))
    return pair


# ------------------------------------------------------------------------------------ text metrics


def test_rouge_l_hand_computed_lcs():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(500 / 6)
    # Lin (2004): LCS "the gunman" = 2; P = 2/4, R = 2/6, F = 2PR / (P + R) = 0.4.
    assert rouge_l("police killed the gunman", ["the gunman was killed by police"]) == pytest.approx(40.0)
    # Case and punctuation are dropped by rouge_score's tokenizer; nothing in common gives 0.
    assert rouge_l("The CAT, sat!", ["the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("blue sky", ["green grass"]) == 0.0


def test_rouge_l_max_over_references_and_stemming():
    references = ["a dog barked", "the cat sat on the mat", "cat mat"]
    each = [rouge_l("the cat sat", [r]) for r in references]
    assert rouge_l("the cat sat", references) == max(each) == each[1]
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)  # Porter: running -> run, dogs -> dog
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert plain.score("run dog", "running dogs")["rougeL"].fmeasure == 0.0


def test_rouge_l_equals_rouge_score_directly():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = np.random.default_rng(0)
    for _ in range(20):
        prediction = " ".join(rng.choice(WORDS, rng.integers(1, 12)))
        references = [" ".join(rng.choice(WORDS, rng.integers(1, 12))) for _ in range(rng.integers(1, 4))]
        expected = 100 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references)
        assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)


def test_exact_match_normalisation_follows_minillm():
    assert exact_match("The Cat!", ["the cat"]) == 100.0
    assert exact_match("  the\n cat  ", ["The cat."]) == 100.0
    assert exact_match("don't", ["dont"]) == 100.0  # punctuation deleted, not replaced by a space
    assert exact_match("cat", ["dog", "Cat"]) == 100.0
    assert exact_match("a cat", ["cat"]) == 0.0  # MiniLLM keeps articles (SQuAD without that step)
    assert exact_match("a cat", ["the cat"], drop_articles=True) == 100.0
    assert exact_match("cats", ["cat"]) == 0.0


def test_score_means_and_rejects_mismatch():
    result = score(["the cat sat", "dog"], [["the cat sat"], ["cat", "house"]])
    assert result == {"rouge_l": pytest.approx(50.0), "exact_match": pytest.approx(50.0)}
    with pytest.raises(ValueError):
        score(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        rouge_l("a", "a")


def test_mean_std_and_length_buckets():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)
    rows = bucket_means([10, 20, 30, 40], [0, 4, 5, 100], edges=(0, 5, 10))
    assert [(r["bucket"], r["count"], r["mean"]) for r in rows] == [
        ("[0, 5)", 2, 15.0), ("[5, 10)", 1, 30.0), ("[10, inf)", 1, 40.0)]


def test_dist_4_hand_counted():
    """Distinct 4-grams over 4-gram positions, N / (L - 3), per answer; the set's value is the mean x 100."""
    repeated = [1, 2, 3, 4, 1, 2, 3, 4, 5]  # (1234) (2341) (3412) (4123) (1234) (2345): 5 distinct of 6
    assert distinct_ngrams(repeated) == pytest.approx(5 / 6)
    assert distinct_ngrams([7] * 5) == pytest.approx(1 / 2)  # (7777) twice
    assert distinct_ngrams([1, 2, 3, 4]) == 1.0 and distinct_ngrams([1, 2, 3]) is None
    assert distinct_ngrams("a b a b a".split(), n=2) == pytest.approx(2 / 4)
    assert dist_n([repeated, [7] * 5, [1, 2, 3]]) == pytest.approx(100 * (5 / 6 + 1 / 2) / 2)  # too short: left out
    assert dist_n([[1, 2], []]) is None


# ------------------------------------------------------------------------------------ calibration


def _brute_force_ece(confidences, correct, n_bins):
    total, n = 0.0, len(confidences)
    for k in range(1, n_bins + 1):
        low, high = (k - 1) / n_bins, k / n_bins
        inside = [i for i, c in enumerate(confidences) if (low < c <= high) or (k == 1 and c == 0)]
        if inside:
            accuracy = sum(correct[i] for i in inside) / len(inside)
            confidence = sum(confidences[i] for i in inside) / len(inside)
            total += len(inside) / n * abs(accuracy - confidence)
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
def test_ece_equals_brute_force(n_bins):
    rng = np.random.default_rng(n_bins)
    confidences = np.concatenate([rng.uniform(0.3, 1.0, 200), np.arange(n_bins + 1) / n_bins, [0.3, 0.7]])  # edges
    correct = rng.uniform(size=len(confidences)) < confidences
    expected = _brute_force_ece(confidences.tolist(), correct.tolist(), n_bins)
    assert expected_calibration_error(confidences, correct, n_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_perfect_and_worst():
    assert expected_calibration_error(np.ones(4), np.ones(4, bool)) == 0.0
    assert expected_calibration_error(np.ones(4), np.zeros(4, bool)) == 1.0


def test_calibration_probabilities_from_first_choice_token(words, tmp_path):
    model = tiny_model(len(words), seed=3)
    records = [{"prompt": "the cat sat on the mat", "choices": [" yes", " no"], "label": 0},
               {"prompt": "dog ran", "choices": [" good", " bad", " old"], "label": 2},
               {"prompt": "the sun", "choices": [" happy sad", " sad"], "label": 1}]
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = calibration(model, words, path, template="raw", n_bins=5, batch_size=2)
    confidences, correct = [], []
    for record, probabilities in zip(records, result["probabilities"]):
        ids = words(record["prompt"])["input_ids"]
        logits = np.asarray(model(np.asarray([ids], np.int32)), np.float64)[0, -1]
        chosen = logits[[words.convert_tokens_to_ids(c.split()[0]) for c in record["choices"]]]
        expected = np.exp(chosen - chosen.max()) / np.exp(chosen - chosen.max()).sum()
        np.testing.assert_allclose(probabilities, expected, atol=1e-6)
        confidences.append(expected.max())
        correct.append(int(expected.argmax()) == record["label"])
    assert result["ece"] == pytest.approx(_brute_force_ece(confidences, correct, 5), abs=1e-6)
    assert result["accuracy"] == pytest.approx(np.mean(correct)) and result["n"] == 3

    path.write_text(json.dumps({"prompt": "x", "choices": [" cat sat", " cat"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="first token"):
        calibration(model, words, path, template="raw")


# ------------------------------------------------------------------------------------ exposure bias


def _kl_float64(hf_student, hf_teacher, out) -> np.ndarray:
    """Per-position KL(p || q) [B, R] from torch logits, in float64, 0 after the response mask."""
    ids = np.concatenate([out.prompt_tokens, out.tokens], 1)
    mask = np.concatenate([out.prompt_mask, out.mask], 1).astype(np.int64)
    R = out.tokens.shape[1]

    def log_softmax(model):
        logits = torch.from_numpy(hf_logits(model, ids, mask)[:, -R - 1:-1].astype(np.float64))
        return torch.log_softmax(logits, -1).numpy()

    log_q, log_p = log_softmax(hf_student), log_softmax(hf_teacher)
    return np.where(np.asarray(out.mask), (np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def test_prefix_kl_equals_float64_torch(hf_pair):
    (hf_student, student), (hf_teacher, teacher) = hf_pair
    config = SamplingConfig(max_new_tokens=8, eos_token_id=tuple(range(0, 96, 3)))  # a third of the ids end a row
    out = generate(student, [[5, 17, 3, 9], [7, 1], [11, 12, 13]] * 2, config, jax.random.key(4))
    out = jax.tree.map(np.asarray, out)
    assert (out.lengths < 8).any()
    ours = np.asarray(prefix_kl(student, teacher, out))
    expected = _kl_float64(hf_student, hf_teacher, out)
    assert (expected[out.mask] > 1e-3).all() and (ours[~out.mask] == 0).all()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_exposure_bias_equals_float64_reconstruction(hf_pair):
    (hf_student, student), (hf_teacher, teacher) = hf_pair
    prompts = [[5, 17, 3, 9], [7, 1], [11, 12, 13], [40, 41]]
    result = exposure_bias(student, teacher, prompts, max_new_tokens=6, seed=3, batch_size=3)
    config = SamplingConfig(max_new_tokens=6)
    curves = {}
    for name, sampler in (("R", student), ("epsilon", teacher)):
        total = np.zeros(6)
        for index, start in enumerate((0, 2)):  # 4 prompts at batch_size 3: two balanced batches of 2
            real = rows = prompts[start:start + 2]  # documented keys: fold_in(key(seed), batch index)
            key = jax.random.fold_in(jax.random.key(3), index)
            out = jax.tree.map(np.asarray, generate(sampler, rows, config, key))
            total += _kl_float64(hf_student, hf_teacher, out)[:len(real)].sum(0)
        curves[name] = np.cumsum(total) / len(prompts)
        np.testing.assert_allclose(result[name], curves[name], rtol=1e-4)
    error = (curves["R"] - curves["epsilon"]) / curves["epsilon"] * 100
    np.testing.assert_allclose(result["exacc_err"], error, rtol=1e-3, atol=1e-6)
    assert list(result["summary"]) == ["1", "6"]
    assert result["summary"]["6"]["R"] == pytest.approx(curves["R"][-1], rel=1e-4)


def test_gold_loss_equals_float64_torch(hf_pair):
    """Per-answer token-mean CE of the first reference after its prompt (EOS not scored), from each row alone
    through transformers in float64, then the mean over answers and the pooled token mean. Rows of several
    lengths (padding), a short last batch, an answer cut at max_response_length and an empty one (left out)."""
    import copy

    (hf_student, student), _ = hf_pair
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 90, int(n)).tolist() for n in (3, 9, 5, 14, 2, 7, 4)]
    gold = [rng.integers(1, 90, int(n)).tolist() for n in (4, 1, 12, 6, 30, 0, 9)]
    eval_set = EvalSet("x", prompts, [["ref"]] * 7, [{}] * 7, gold=gold)
    result = gold_loss(student, eval_set, max_response_length=20, batch_size=3)
    reference = copy.deepcopy(hf_student).double()
    per_answer, nll_sum, count = [], 0.0, 0
    for prompt, answer in zip(prompts, gold):
        answer = answer[:20]
        if not answer:
            continue
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            log_q = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1).numpy()
        nll = -log_q[np.arange(len(prompt) - 1, len(prompt) + len(answer) - 1), answer]
        per_answer.append(nll.mean())
        nll_sum, count = nll_sum + nll.sum(), count + len(answer)
    assert result["lm_loss_tokens"] == count == 4 + 1 + 12 + 6 + 20 + 9
    assert result["lm_loss"] == pytest.approx(np.mean(per_answer), rel=1e-5)
    assert result["lm_loss_per_token"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert result["lm_loss"] != pytest.approx(result["lm_loss_per_token"], rel=1e-3)  # the two means differ here


def test_gold_answers_follow_the_tokenisation_rule(smollm2_tokenizer):
    """gold = the first reference's ids past the untruncated prompt (joint tokenisation), without the EOS."""
    from conftest import SHARED_DATA

    eval_set = load_eval_set("sinst", SHARED_DATA / SINST, smollm2_tokenizer, template="chat", limit=20)
    assert len(eval_set.gold) == 20
    for record, gold in zip(eval_set.records, eval_set.gold):
        assert smollm2_tokenizer.eos_token_id not in gold
        assert smollm2_tokenizer.decode(gold) == record["references"][0]


# ------------------------------------------------------------------------------------ data


def test_load_dolly_truncates_to_first_256_tokens(smollm2_tokenizer, caplog):
    from conftest import SHARED_DATA

    records = [json.loads(line) for line in (SHARED_DATA / DOLLY).read_text().splitlines()]
    with caplog.at_level("WARNING", logger="minillm_jax.evaluate"):
        eval_set = load_eval_set("dolly", SHARED_DATA / DOLLY, smollm2_tokenizer)
    assert len(eval_set) == len(eval_set.records) == 500
    assert eval_set.references == [[r["output"]] for r in records]
    full = [smollm2_tokenizer(format_prompt(r), add_special_tokens=True)["input_ids"] for r in records]
    assert eval_set.prompts == [ids[:256] for ids in full]
    cut = sum(len(ids) > 256 for ids in full)
    assert cut > 0  # some prompts were cut, none dropped, and the user is told how many
    assert f"dolly: {cut} of 500 prompts are longer than max_prompt_length=256" in caplog.text
    assert len(load_eval_set("dolly", SHARED_DATA / DOLLY, smollm2_tokenizer, limit=7)) == 7


def test_load_sinst_keeps_reference_lists(smollm2_tokenizer):
    from conftest import SHARED_DATA

    records = [json.loads(line) for line in (SHARED_DATA / SINST).read_text().splitlines()]
    eval_set = load_eval_set("sinst", SHARED_DATA / SINST, smollm2_tokenizer)
    assert len(eval_set) == 1694
    assert eval_set.references == [r["references"] for r in records]
    assert max(map(len, eval_set.references)) > 1
    long_enough = [len(smollm2_tokenizer(r["output"], add_special_tokens=False)["input_ids"]) >= 11 for r in records]
    filtered = load_eval_set("sinst", SHARED_DATA / SINST, smollm2_tokenizer, min_reference_tokens=11)
    assert len(filtered) == sum(long_enough) < 1694
    assert filtered.references == [r["references"] for r, keep in zip(records, long_enough) if keep]


# ------------------------------------------------------------------------------------ end to end


def _word_sets(words, tmp_path) -> list[EvalSet]:
    rng = np.random.default_rng(0)

    def sentence(n):
        return " ".join(rng.choice(WORDS, n))

    plain = [{"instruction": sentence(4), "input": "", "output": sentence(int(n))} for n in (2, 7, 15, 30, 60)]
    multi = [{"instruction": sentence(3), "input": sentence(2), "output": "x",
              "references": [sentence(6), sentence(12)]} for _ in range(3)]
    sets = []
    for name, records in (("plain", plain), ("multi", multi)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        sets.append(load_eval_set(name, path, words))
    return sets


def test_answers_reverse_kl_sums_each_steps_kl_over_the_vocabulary(words):
    """Per answer: sum over its steps (the closing EOS included) of KL(q || p) at the sampled prefixes, against
    float64 log-softmaxes of both models' full forwards on prompt + answer."""
    model, teacher = tiny_model(len(words), seed=1), tiny_model(len(words), seed=2)
    prompts = [words(t)["input_ids"] for t in ("the cat sat on", "one two", "red blue green house tree")]
    sampling = SamplingConfig(max_new_tokens=12, eos_token_id=0, pad_token_id=0)
    answers = sample_answers(model, words, prompts, sampling, seed=3, batch_size=4, teacher=teacher)
    steps = [len(t) + (len(t) < 12) for t in answers.tokens]  # an answer that stopped early scored its EOS
    assert answers.scored_tokens == sum(steps) and min(steps) < 12 and max(steps) > 3
    for prompt, tokens, n, kl in zip(prompts, answers.tokens, steps, answers.reverse_kl):
        ids = np.asarray([prompt + tokens], np.int32)
        log = {}
        for m in (model, teacher):  # the distributions of steps 0 .. n - 1 (the last one: the EOS step's, if any)
            logits = np.asarray(m(ids, np.ones_like(ids, bool))[0, len(prompt) - 1:], np.float64)[:n]
            log[m] = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        expected = np.sum(np.exp(log[model]) * (log[model] - log[teacher]))
        assert kl == pytest.approx(expected, rel=1e-4)


def test_evaluate_model_end_to_end(words, tmp_path):
    model, teacher = tiny_model(len(words), seed=1), tiny_model(len(words), seed=2)
    sets = _word_sets(words, tmp_path)
    results = evaluate_model(model, words, sets, seeds=(10, 20), max_new_tokens=12, batch_size=4, teacher=teacher)
    assert set(results) == {"plain", "multi"}
    for eval_set in sets:
        r = results[eval_set.name]
        assert r["n"] == len(eval_set) and set(r["per_seed"]) == {"10", "20"}
        numbers = [r["rouge_l_mean"], r["rouge_l_std"], r["exact_match_mean"], r["length_mean"], r["reverse_kl"]]
        assert np.isfinite(numbers).all() and 0 < r["length_mean"] <= 12
        assert r["per_seed"]["10"]["rouge_l"] != r["per_seed"]["20"]["rouge_l"]
        assert sum(b["count"] for b in r["rouge_l_by_length"]) == len(eval_set)
        # The same seed and batch size reproduce a seed's score through the public generate_texts.
        sampling = SamplingConfig(max_new_tokens=12, eos_token_id=0, no_repeat_ngram_size=6, pad_token_id=0)
        texts, tokens = generate_texts(model, words, eval_set.prompts, sampling, seed=20, batch_size=4)
        assert score(texts, eval_set.references)["rouge_l"] == pytest.approx(r["per_seed"]["20"]["rouge_l"])
        assert all(0 not in row for row in tokens)
        assert r["per_seed"]["20"]["dist_4"] == pytest.approx(dist_n(tokens, 4))
        assert r["dist_4_mean"] == pytest.approx(np.mean([r["per_seed"][k]["dist_4"] for k in ("10", "20")]))
        assert 0 < r["reverse_kl_per_token"] < r["reverse_kl"]  # answers are longer than one token
        assert r["lm_loss"] == pytest.approx(gold_loss(model, eval_set, max_response_length=12)["lm_loss"])
    counts = [b["count"] for b in results["plain"]["rouge_l_by_length"]]
    assert counts == [1, 1, 1, 1, 1]  # gold lengths 2, 7, 15, 30, 60 words: one per default bucket


# ------------------------------------------------------------------------------------ report files


def test_write_report_and_plot_curves(tmp_path):
    per_set = {"n": 3, "rouge_l_mean": 24.56, "rouge_l_std": 0.31, "exact_match_mean": 1.0, "exact_match_std": 0.0,
               "length_mean": 41.2, "rouge_l_by_length": bucket_means([10, 20, 30], [1, 7, 60])}
    scored = {**per_set, "dist_4_mean": 97.126, "lm_loss_per_token": 2.25, "lm_loss": None,
              "reverse_kl": np.float32(1.5), "reverse_kl_per_token": 0.041}
    exposure = {"num_prompts": 4, "summary": {"1": {"R": 0.25, "epsilon": 0.5, "exacc_err": -50.0},
                                              "10": {"R": 2.0, "epsilon": 0.0, "exacc_err": None}}}
    calibrated = {"ece": 0.125, "accuracy": 0.75, "mean_confidence": 0.875, "n": 8}
    results = {"minillm-120M": {"dolly": per_set, "self_inst": scored, "exposure_bias": exposure,
                                "calibration": calibrated},
               "teacher": {"dolly": per_set, "calibration": {**calibrated, "ece": 0.0625}}}
    json_path, md_path = write_report(results, tmp_path / "report")
    assert json.loads(json_path.read_text())["minillm-120M"]["self_inst"]["reverse_kl"] == 1.5
    table = md_path.read_text()
    assert "| minillm-120M | dolly | 3 | 24.56 ± 0.31 | 1.00 | – | 41.2 | – | – | – |" in table
    assert "| minillm-120M | self_inst | 3 | 24.56 ± 0.31 | 1.00 | 97.13 | 41.2 | 2.250 | 0.041 | 1.500 |" in table
    assert "| teacher | dolly | 3 |" in table
    assert "[5, 10): 20.0 (1)" in table
    assert "Exposure bias of minillm-120M over 4 prompts" in table
    assert "| 1 | 0.250 | 0.500 | -50.0 |\n| 10 | 2.000 | 0.000 | – |" in table
    assert "| minillm-120M | 8 | 0.1250 | 0.7500 | 0.8750 |\n| teacher | 8 | 0.0625 |" in table
    assert "Exposure bias of teacher" not in table

    _, bare = write_report({"dolly": per_set}, tmp_path / "bare")
    assert "| model | dolly | 3 | 24.56 ± 0.31 |" in bare.read_text()

    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 3.0 / (s + 1), "lr": 1e-4} for s in range(5)] + [{"step": 4, "val_rouge_l": 20.5}]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    png = plot_curves(log, tmp_path / "plots" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_curves(log, tmp_path / "none.png", keys=[])
