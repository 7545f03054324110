"""RULER tasks generated offline (`sparseattn.eval.ruler`, `sparseattn ruler`): prompts, scoring, the dense vs
sparse run and its report, on a byte-level tokenizer and a tiny random Llama."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.cli.main import main  # noqa: E402
from sparseattn.eval import ruler  # noqa: E402
from sparseattn.eval.ruler import TASKS, make_ruler_sample, parse_tasks, string_match_all  # noqa: E402

TEXT = ("Marmalade harbours glitter under copper lanterns. Every quiet orchard remembers autumn storms. "
        "Seventeen violins practised beside the granite lighthouse. Curious otters negotiate with patient herons. "
        "A velvet comet drifted past the sleepy observatory. Brave cartographers sketched unknown archipelagos. ")


@pytest.fixture(scope="module")
def tok():
    from sparseattn.testing.bad_inputs import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def sentences():
    from sparseattn.eval.niah import _sentences

    return _sentences([("t", TEXT * 3)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """A 2-layer random Llama saved with the byte-level tokenizer, and a folder with one synthetic text."""
    d = tmp_path_factory.mktemp("tiny_ruler")
    model_dir = d / "model"
    tok.save_pretrained(str(model_dir))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1400)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(model_dir))
    texts = d / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT * 4)
    (texts / "b.md").write_text(TEXT[::-1])
    return model_dir, texts


def _text(tok, sample) -> str:
    return tok.decode(sample["input_ids"][0].tolist())


# --------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("task", TASKS)
def test_every_task_fits_its_budget_holds_its_answers_and_is_seeded(tok, sentences, task):
    for n in (1024, 1500):
        s = make_ruler_sample(tok, task, length=n, seed=5, sentences=sentences)
        assert s["input_ids"].shape == (1, s["prompt_tokens"])
        if task.startswith("niah") or task == "vt":
            assert s["prompt_tokens"] == n
        else:  # word lists end at the last whole item: a few tokens short at most
            assert n - 24 <= s["prompt_tokens"] <= n
        text = _text(tok, s)
        assert s["answers"] and all(a in text for a in s["answers"])
        again = make_ruler_sample(tok, task, length=n, seed=5, sentences=sentences)
        assert torch.equal(again["input_ids"], s["input_ids"]) and again["answers"] == s["answers"]
        other = make_ruler_sample(tok, task, length=n, seed=6, sentences=sentences)
        assert not torch.equal(other["input_ids"], s["input_ids"])


def test_niah_variants_ask_what_they_should(tok, sentences):
    needle = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
    for task, keys, values_per_key, asked in (("niah_single", 1, 1, 1), ("niah_multikey", 4, 1, 1),
                                              ("niah_multivalue", 1, 4, 1), ("niah_multiquery", 4, 1, 4)):
        s = make_ruler_sample(tok, task, length=1200, seed=1, sentences=sentences)
        text = _text(tok, s)
        found = needle.findall(text)
        by_key = collections.defaultdict(list)
        for k, v in found:
            by_key[k].append(v)
        assert len(by_key) == keys and all(len(v) == values_per_key for v in by_key.values()), task
        question = text[text.index("What are all the special magic numbers for"):]
        asked_keys = [k for k in by_key if k in question]
        assert len(asked_keys) == asked, task
        assert sorted(s["answers"]) == sorted(v for k in asked_keys for v in by_key[k]), task
        # the needles lie inside the haystack (real text around them), not in the question
        assert text.index(found[0][1]) < text.index("What are all")
        assert "Marmalade" in text or "orchard" in text


def test_variable_tracking_chain(tok, sentences):
    s = make_ruler_sample(tok, "vt", length=1200, seed=2, sentences=sentences)
    text = _text(tok, s)
    names = s["answers"]
    assert len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", x) for x in names)
    value = s["query"]
    pos = [text.index(f"VAR {names[0]} = {value}.")]
    pos += [text.index(f"VAR {names[i + 1]} = VAR {names[i]}.") for i in range(4)]
    assert pos == sorted(pos) and pos[-1] < text.index("Question: Find all variables")


def test_common_words_counts(tok):
    vocab = ruler._vocabulary([TEXT])
    s = make_ruler_sample(tok, "cwe", length=1500, seed=3, vocabulary=vocab)
    text = _text(tok, s)
    items = re.findall(r" (\d+)\. ([a-z]+)", text)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = collections.Counter(w for _, w in items)
    common = set(s["answers"])
    assert len(common) == 10
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)
    assert common <= set(vocab)  # the text has enough words for the common ones; rare ones may be pseudo-words
    assert len(set(counts) & set(vocab)) == s["meta"]["words_from_text"]
    # no answer hides inside another listed word (substring scoring could not tell them apart)
    assert not [(a, w) for a in common for w in counts if a != w and a in w]


def test_frequent_words_counts(tok):
    s = make_ruler_sample(tok, "fwe", length=1500, seed=4)
    text = _text(tok, s)
    body = text[text.index("coded words.") + len("coded words."): text.index("\nQuestion")]
    counts = collections.Counter(body.split())
    assert counts.most_common(1)[0][0] == "...."
    ranked = [w for w, _ in counts.most_common() if w != "...."]
    assert ranked[:3] == s["answers"]
    assert counts[ranked[2]] > counts[ranked[3]]


def test_chat_template_frames_the_prompt(tok, sentences):
    chat = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    chat.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}<|assistant|>\n"
    s = make_ruler_sample(chat, "niah_single", length=1100, seed=0, sentences=sentences)
    text = _text(chat, s)
    assert s["prompt_tokens"] == 1100
    assert text.startswith("<s><|user|>Some special magic numbers")
    # (jinja drops the template's last newline: the answer prefix keeps its leading space)
    assert text.endswith(f"<|assistant|> The special magic numbers for {s['query']} mentioned in the provided text are")


def test_bad_arguments_are_value_errors(tok, sentences):
    with pytest.raises(ValueError, match="too short for task 'niah_multiquery'"):
        make_ruler_sample(tok, "niah_multiquery", length=300, sentences=sentences)
    with pytest.raises(ValueError, match="too short for task 'cwe'"):
        make_ruler_sample(tok, "cwe", length=260)
    with pytest.raises(ValueError, match="task is unknown"):
        make_ruler_sample(tok, "qa", length=1000)
    assert parse_tasks("all") == list(TASKS) and parse_tasks("vt, cwe,vt") == ["vt", "cwe"]
    with pytest.raises(ValueError, match="unknown task 'niah'"):
        parse_tasks("niah,vt")


# --------------------------------------------------------------------------- scoring
def test_string_match_all_is_rulers_recall():
    assert string_match_all("the numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("The numbers are 1234567.", ["1234567", "7654321"]) == 0.5
    assert string_match_all("Answer: APPLE, pear", ["apple", "PEAR", "plum", "fig"]) == 0.5
    assert string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="answers is empty"):
        string_match_all("x", [])


def test_continuation_stops_at_the_first_special_token(tok):
    ids = tok("12 34", add_special_tokens=False)["input_ids"]
    after = tok("99", add_special_tokens=False)["input_ids"]
    assert ruler._continuation(tok, ids + [tok.eos_token_id] + after) == "12 34"
    assert ruler._continuation(tok, ids) == "12 34"


# --------------------------------------------------------------------------- running
def test_scores_follow_the_generated_text(tiny, monkeypatch, tmp_path):
    """A stand-in generator that answers right on the dense model and wrong once patched: dense scores 1, sparse 0,
    and the sparse configuration still ran its prefill (its density is recorded)."""
    from sparseattn.eval import end_to_end
    from sparseattn.integrations.transformers_patch import get_handle
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    real_generate, real_make = end_to_end.greedy_generate, ruler.make_ruler_sample
    made: list = []

    def make(*a, **kw):
        made.append(real_make(*a, **kw))
        return made[-1]

    def generate(model_, ids, *, gen_tokens, score_last, stop_ids=()):
        assert tok.eos_token_id in stop_ids  # generation stops where scoring stops reading
        out = real_generate(model_, ids, gen_tokens=1, score_last=score_last)
        smp = next(m for m in made if torch.equal(m["input_ids"].to(ids.device), ids))  # the prompt being run
        h = get_handle(model_)  # dense runs inside the patched model with its own attention (handle.suspended())
        dense = h is None or model_.config._attn_implementation != h.impl_name
        said = ", ".join(smp["answers"]) if dense else "I do not know"
        out["tokens"] = tok(" " + said, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return out

    monkeypatch.setattr(ruler, "make_ruler_sample", make)
    monkeypatch.setattr(end_to_end, "greedy_generate", generate)
    res = ruler.run_ruler("tiny", model=model, tokenizer=tok, predictors=None,
                          patterns="sink_window:sink_blocks=1,window_blocks=2", tasks="niah_single,vt,fwe",
                          lengths=[1100], samples=2, text_dir=str(tiny[1]), progress=False,
                          runs_path=tmp_path / "runs.jsonl")
    sparse = "pattern sink_window:sink_blocks=1,window_blocks=2"
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 * 3 * 2 and {r["config"] for r in runs} == {"dense", sparse}  # one line per finished run
    assert sorted(r["score"] for r in runs) == [0.0] * 6 + [1.0] * 6
    assert [r["config"] for r in runs] == ["dense", sparse] * 6  # pairs: an interrupted job keeps both sides
    assert res.configs == ["dense", sparse]
    assert res.summary["mean_score"] == {"dense": 1.0, sparse: 0.0}
    assert all(res.scores["dense"][t]["1100"] == 1.0 for t in res.tasks)
    assert 0.0 < res.summary["sparsity"][sparse] < 1.0 and res.summary["sparsity"]["dense"] == 0.0
    assert len(res.cases) == 3 * 2 and all(c["outputs"]["dense"] == ", ".join(c["answers"]) for c in res.cases)
    assert made[0]["task"] == "niah_single" and "orchard" in tok.decode(made[0]["input_ids"][0])  # the --text-dir haystack


def test_cli_end_to_end_report(tiny, tmp_path, capsys):
    model_dir, texts = tiny
    out = tmp_path / "r"
    rc = main(["ruler", "--model", str(model_dir), "--text-dir", str(texts), "--lengths", "1024", "--samples", "1",
               "--gen-tokens", "3", "--predictors", "mean_sim:cdf_threshold=0.9",
               "--patterns", "sink_window:sink_blocks=1,window_blocks=2", "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((out / "ruler.json").read_text())
    configs = ["dense", "mean_sim:cdf_threshold=0.9", "pattern sink_window:sink_blocks=1,window_blocks=2"]
    assert res["configs"] == configs and res["tasks"] == list(TASKS) and res["lengths"] == [1024]
    assert len(res["cases"]) == len(TASKS)
    for c in res["cases"]:  # every stored score is RULER's recall of the stored output
        for name in configs:
            assert c["scores"][name] == string_match_all(c["outputs"][name], c["answers"])
    for name in configs:
        for t in TASKS:
            assert 0.0 <= res["scores"][name][t]["1024"] <= 1.0
    assert 0.0 < res["summary"]["sparsity"][configs[2]] < 1.0
    # a Llama has no window layers: the predicted layers are all layers
    for name in configs:
        assert res["summary"]["sparsity_predicted_layers"][name] == pytest.approx(res["summary"]["sparsity"][name])
        assert all(c["density_predicted"][name] == pytest.approx(c["density"][name]) for c in res["cases"])
    md = (out / "ruler.md").read_text()
    assert "| cwe | 1024 |" in md and "block sparsity" in md and all(f"`{n}`" in md for n in configs)
    assert "sparsity, predicted layers" in md
    assert (out / "ruler_heatmap.png").is_file() or "heatmap skipped" in cap.err
    assert "report:" in cap.out and "mean" in cap.out and "sparsity, predicted layers" in cap.out


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "niah,vt"], "unknown task 'niah'"),
    (["--predictors", "mean_sim:no_such_key=1"], "no_such_key"),
    (["--lengths", "300", "--tasks", "niah_multiquery"], "too short for task 'niah_multiquery'"),
    (["--lengths", "1390"], "max_position_embeddings"),
    (["--text-dir", "/nonexistent/essays"], "does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys, argv, words):
    rc = main(["ruler", "--model", str(tiny[0]), "--quiet", "--no-plots", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparseattn ruler: error: ") and words in lines[0], err


def test_greedy_generate_stops_at_a_stop_token(tiny):
    from sparseattn.eval.end_to_end import greedy_generate
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    ids = torch.tensor([tok("an orchard of numbers", add_special_tokens=False)["input_ids"]])
    free = greedy_generate(model, ids, gen_tokens=5, score_last=1)["tokens"]
    assert len(free) == 5
    cut = greedy_generate(model, ids, gen_tokens=5, score_last=1, stop_ids={free[1]})["tokens"]
    assert cut == free[:free.index(free[1]) + 1]  # ends with the first stop token, the steps before unchanged


def test_greedy_generate_batch_matches_one_prompt_at_a_time(tiny):
    """A batch of equal-length prompts decodes each row as greedy_generate decodes it alone, and a stop token ends
    only the rows that produced it (each row's tokens end with its first stop token)."""
    from sparseattn.eval.end_to_end import greedy_generate, greedy_generate_batch
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    texts = ["an orchard of numbers", "a violin by the shore", "seventeen quiet herons"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(len(r) for r in rows)
    ids = torch.tensor([r[:n] for r in rows])
    with torch.no_grad():
        alone = [greedy_generate(model, ids[i:i + 1], gen_tokens=6, score_last=1)["tokens"] for i in range(3)]
        batch = greedy_generate_batch(model, ids, gen_tokens=6)
    assert batch["tokens"] == alone and batch["prefill_s"] >= 0.0
    stop = alone[0][1]
    with torch.no_grad():
        cut = greedy_generate_batch(model, ids, gen_tokens=6, stop_ids={stop})["tokens"]
    for row, free in zip(cut, alone):
        assert row == (free[:free.index(stop) + 1] if stop in free else free)
    with pytest.raises(ValueError, match=r"^greedy_generate_batch: ids must be a non-empty 2-D batch"):
        greedy_generate_batch(model, ids[0], gen_tokens=2)


def test_batched_run_matches_the_unbatched_run(tiny, tmp_path):
    """batch_size only groups prompts of one task, length and token count: outputs, scores and the sparse
    configuration's per-prompt records equal the one-at-a-time run's; the paired deltas are in the summary."""
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    kw = dict(model=model, tokenizer=tok, predictors=None, patterns="sink_window:sink_blocks=1,window_blocks=2",
              tasks="niah_single,fwe", lengths=[1100], samples=3, text_dir=str(tiny[1]), gen_tokens=4, progress=False)
    one = ruler.run_ruler("tiny", batch_size=1, **kw)
    three = ruler.run_ruler("tiny", batch_size=3, runs_path=tmp_path / "runs.jsonl", **kw)
    assert [c["outputs"] for c in three.cases] == [c["outputs"] for c in one.cases]
    assert [c["scores"] for c in three.cases] == [c["scores"] for c in one.cases]
    batches = {c["task"]: c["batch"]["dense"] for c in three.cases}
    assert batches["niah_single"] == 3  # exactly 1100 tokens each: one batch
    assert three.config["batch_size"] == 3 and one.config["batch_size"] == 1
    sparse = three.configs[1]
    d = three.summary["delta_vs_dense"][sparse]["niah_single"]["1100"]
    want = sum(c["scores"][sparse] - c["scores"]["dense"] for c in three.cases if c["task"] == "niah_single") / 3
    assert d["n"] == 3 and d["mean"] == pytest.approx(want) and d["se"] >= 0.0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 * 2 * 3 and {r["batch"] for r in runs if r["task"] == "niah_single"} == {3}
    with pytest.raises(ValueError, match=r"^run_ruler: batch_size"):
        ruler.run_ruler("tiny", batch_size=0, **kw)


def test_a_batch_out_of_gpu_memory_is_rerun_as_halves(tiny, monkeypatch):
    """A batch the GPU cannot hold (a 16K Gemma batch of 8 on an 80 GB card) is run again as halves, with one
    warning; the outputs equal the one-at-a-time run's (simulated: batches of more than one prompt raise OOM)."""
    from sparseattn.eval import end_to_end
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    kw = dict(model=model, tokenizer=tok, predictors=None, patterns="sink_window:sink_blocks=1,window_blocks=2",
              tasks="niah_single", lengths=[1100], samples=3, text_dir=str(tiny[1]), gen_tokens=4, progress=False)
    one = ruler.run_ruler("tiny", batch_size=1, **kw)
    real = end_to_end.greedy_generate_batch
    sizes: list[int] = []

    def fake(model, ids, **k):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, **k)

    monkeypatch.setattr(end_to_end, "greedy_generate_batch", fake)
    with pytest.warns(RuntimeWarning, match=r"run_ruler: a batch of 3 prompts of 1100 tokens ran out of GPU memory"):
        three = ruler.run_ruler("tiny", batch_size=3, **kw)
    assert [c["outputs"] for c in three.cases] == [c["outputs"] for c in one.cases]
    assert sizes.count(3) == 2 and sizes.count(2) == 2  # dense and sparse: 3 -> (1, 2 -> (1, 1))


# --------------------------------------------------------------------------- NIAH with decode paths (issue 14)
def test_niah_decode_modes_score_each_path(tiny, tmp_path):
    """``run_niah(decode_modes=...)`` runs each decode path after a dense prefill and scores it like the dense run:
    the dense decode kernel and sparse decode keeping every page reproduce dense's text (fp32, reference decode);
    the mixed INT8 cache runs; the report has a row per mode; an unknown mode fails before the model runs."""
    from sparseattn.eval.niah import run_niah, write_niah_report
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    kw = dict(model=model, tokenizer=tok, lengths=[1100], depths=[0.5], trials=2, gen_tokens=6, progress=False,
              text_dir=str(tiny[1]), pattern="sink_window:sink_blocks=1,window_blocks=2")
    res = run_niah(decode_modes=["kernel_decode", "sparse_decode", "mixed_int8"], top_pages=1.0, page_size=16,
                   mixed_window=128, **kw)
    assert res.config["decode_modes"] == ["kernel_decode", "sparse_decode", "mixed_int8"]
    for c in res.cases:
        assert set(c["mode_output"]) == {"kernel_decode", "sparse_decode", "mixed_int8"}
        assert c["mode_output"]["kernel_decode"] == c["dense_output"]
        assert c["mode_output"]["sparse_decode"] == c["dense_output"]  # every page kept
        assert all(c["mode_correct"][m] == (c["value"] in c["mode_output"][m]) for m in c["mode_output"])
    s = res.summary
    assert s["mode_agreement"]["kernel_decode"] == 1.0 and set(s["mode_accuracy"]) == set(res.config["decode_modes"])
    md = write_niah_report(res, tmp_path, plots=False)["markdown"].read_text()
    assert "| mixed_int8 |" in md and "Decode modes" in md
    assert "decode mode sparse_decode" in res.table()
    with pytest.raises(ValueError, match=r"^run_niah: decode_modes has an unknown mode 'sparse_prefill'"):
        run_niah(decode_modes=["sparse_prefill"], **kw)


def test_niah_sparse_spec_gives_dense_text(tiny):
    """sparse_spec in NIAH: 2 pages per KV head draft, the exact step keeps dense's text on every case."""
    from sparseattn.eval.niah import run_niah
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    res = run_niah(model=model, tokenizer=tok, lengths=[1100], depths=[0.5], trials=2, gen_tokens=8, progress=False,
                   text_dir=str(tiny[1]), decode_modes=["sparse_spec"], top_pages=2, page_size=16,
                   pattern="sink_window:sink_blocks=1,window_blocks=2")
    for c in res.cases:
        assert c["mode_output"]["sparse_spec"] == c["dense_output"]
    assert res.summary["mode_agreement"]["sparse_spec"] == 1.0


def test_niah_cli_rejects_an_unknown_decode_mode(tiny, tmp_path, capsys):
    rc = main(["niah", "--model", str(tiny[0]), "--lengths", "1100", "--decode-modes", "kernel_decode,quest",
               "--quiet", "--no-plots", "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--decode-modes has an unknown mode 'quest'" in err[0], err


def test_floor_configuration_is_run_and_compared(tiny, tmp_path):
    """``floor=True`` adds the all-blocks configuration right after dense; every other sparse configuration gets
    paired deltas against it; in float32 the default leaves it out."""
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    kw = dict(model=model, tokenizer=tok, predictors=None, patterns="sink_window:sink_blocks=1,window_blocks=2",
              tasks="niah_single", lengths=[1100], samples=2, text_dir=str(tiny[1]), gen_tokens=3, progress=False)
    res = ruler.run_ruler("tiny", floor=True, **kw)
    sparse = "pattern sink_window:sink_blocks=1,window_blocks=2"
    assert res.configs == ["dense", ruler.FLOOR_LABEL, sparse] and res.config["floor"] is True
    assert res.summary["sparsity"][ruler.FLOOR_LABEL] == pytest.approx(0.0)
    d = res.summary["delta_vs_floor"][sparse]["niah_single"]["1100"]
    want = sum(c["scores"][sparse] - c["scores"][ruler.FLOOR_LABEL] for c in res.cases) / 2
    assert set(res.summary["delta_vs_floor"]) == {sparse} and d["n"] == 2 and d["mean"] == pytest.approx(want)
    md = ruler.write_ruler_report(res, tmp_path, plots=False)["markdown"].read_text()
    assert f"Score − `{ruler.FLOOR_LABEL}`" in md and "| niah_single | 1100 | " in md
    off = ruler.run_ruler("tiny", **kw)  # float32 model: no floor by default
    assert off.configs == ["dense", sparse] and off.summary["delta_vs_floor"] == {}


def test_dense_tails_run_each_configuration_once_per_tail(tiny, tmp_path, monkeypatch):
    """``dense_tails=(0, 64)`` runs every sparse configuration twice (the second labelled ``+ dense tail 64``, patched
    with ``dense_tail=64``), the floor once; the tail row is denser; bad tails fail before the model runs."""
    from sparseattn.integrations import transformers_patch
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    seen: list = []
    real = transformers_patch.patch_model

    def spy(*a, **kw):
        seen.append(kw.get("dense_tail"))
        return real(*a, **kw)

    monkeypatch.setattr(transformers_patch, "patch_model", spy)
    kw = dict(model=model, tokenizer=tok, predictors=None, patterns="sink_window:sink_blocks=1,window_blocks=2",
              tasks="niah_single", lengths=[1100], samples=1, text_dir=str(tiny[1]), gen_tokens=2, progress=False)
    res = ruler.run_ruler("tiny", floor=True, dense_tails=(0, 64), **kw)
    sparse = "pattern sink_window:sink_blocks=1,window_blocks=2"
    assert res.configs == ["dense", ruler.FLOOR_LABEL, sparse, f"{sparse} + dense tail 64"]
    assert seen == [0, 0, 64] and res.config["dense_tails"] == {f"{sparse} + dense tail 64": 64}
    assert res.summary["density"][f"{sparse} + dense tail 64"] > res.summary["density"][sparse]
    for bad in [(), (0, 0), (-1,)]:
        with pytest.raises(ValueError, match=r"^run_ruler: dense_tail"):
            ruler.run_ruler("tiny", dense_tails=bad, **kw)
    assert len(seen) == 3  # nothing ran for the bad tails


def test_niah_dense_tail_is_applied_and_checked(tiny, tmp_path, capsys):
    from sparseattn.eval.niah import run_niah
    from sparseattn.models.loader import load

    model, tok = load(str(tiny[0]))
    kw = dict(model=model, tokenizer=tok, lengths=[1100], depths=[0.5], trials=1, gen_tokens=2, progress=False,
              text_dir=str(tiny[1]), pattern="sink_window:sink_blocks=1,window_blocks=2")
    plain, tail = run_niah(**kw), run_niah(dense_tail=128, **kw)
    assert (plain.config["dense_tail"], tail.config["dense_tail"]) == (0, 128)
    assert tail.cases[0]["sparse_density"] > plain.cases[0]["sparse_density"]
    rc = main(["niah", "--model", str(tiny[0]), "--lengths", "1100", "--dense-tail", "-3", "--quiet", "--no-plots",
               "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "run_niah: dense_tail must be a non-negative int" in err[0], err


def test_console_table_keeps_the_dense_tail_visible():
    short = ruler._short_label
    assert short("mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8 + dense tail 128", 30) == \
        "mean_sim:score=mixed, +tail128"
    assert short("mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8", 30) == "mean_sim:score=mixed,cdf_thres"
    assert short("dense", 30) == "dense"


def test_ruler_power_simulation_bounds():
    """``benchmarks/ruler_power.py``'s pass probability: 1 when no prompt ever changes, 0 when every prompt loses,
    and for an unbiased predictor that flips often it rises with the prompt count (the docs' argument)."""
    import importlib.util
    import os

    import numpy as np

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "ruler_power.py")
    spec = importlib.util.spec_from_file_location("ruler_power", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    tasks = mod.rs.TASKS
    assert mod.CELLS == 35
    assert mod.p_pass({t: [0.0] * 10 for t in tasks}, 10, 200, rng, unbiased=True) == 1.0
    assert mod.p_pass({t: [-1.0] * 10 for t in tasks}, 10, 200, rng, unbiased=False) == 0.0
    flips = {t: [0.0] * 98 + [1.0, -1.0] for t in tasks}  # 2% of prompts change, balanced
    few = mod.p_pass(flips, 10, 2000, rng, unbiased=True)
    many = mod.p_pass(flips, 1000, 2000, rng, unbiased=True)
    assert few < 0.05 and many > 0.9
