"""Local datasets to token sequences with loss masks; lm-eval prompt strings; errors."""

import csv
import hashlib
import json
import sys

import pytest
from mlx_lm.utils import load_tokenizer

from mlx_knnmoe.data.examples import Dataset, encode_pair, load_dataset
from mlx_knnmoe.data.formats import detect_format, multiple_choice
from mlx_knnmoe.data.records import DataError, read_records
from tests.tiny_models import make_tiny_model_dir

MEDMCQA = {
    "question": "Which vitamin deficiency causes scurvy?",
    "opa": "Vitamin A",
    "opb": "Vitamin C",
    "opc": "Vitamin D",
    "opd": "Vitamin K",
    "cop": 1,
}
MEDQA = {
    "sent1": "A 23-year-old presents with fever. What is the next step?",
    "ending0": "Reassure",
    "ending1": "Blood cultures",
    "ending2": "Chest X-ray",
    "ending3": "Discharge",
    "label": 2,
}
MMLU = {"question": "  What is 2 + 2?\n", "choices": ["3", "4", "5", "22"], "answer": 1}
GPQA = {
    "Question": "Which gas is inert?",
    "Correct Answer": "  Argon [title] noble  gas ",
    "Incorrect Answer 1": "Oxygen",
    "Incorrect Answer 2": "Chlorine",
    "Incorrect Answer 3": "Fluorine",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def targets(tok, example):
    return tok.decode([t for t, m in zip(example.tokens, example.loss_mask) if m])


def load(path, tok, **kwargs):
    return load_dataset(path, tok, **{"shuffle": False, **kwargs})


# ---------------------------------------------------------------- lm-eval prompt strings


@pytest.mark.parametrize(
    "record, fmt, prompt, gold",
    [
        (
            MEDMCQA,
            "medmcqa",
            "Question: Which vitamin deficiency causes scurvy?\nChoices:\nA. Vitamin A\n"
            "B. Vitamin C\nC. Vitamin D\nD. Vitamin K\nAnswer:",
            1,
        ),
        (
            MEDQA,
            "medqa",
            "Question: A 23-year-old presents with fever. What is the next step?\n"
            "A. Reassure\nB. Blood cultures\nC. Chest X-ray\nD. Discharge\nAnswer:",
            2,
        ),
        (MMLU, "mmlu", "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:", 1),
    ],
)
def test_letter_choice_prompts_match_lm_eval(record, fmt, prompt, gold):
    mc = multiple_choice(record, fmt)
    assert mc.prompt == prompt
    assert mc.choices == [" A", " B", " C", " D"]
    assert mc.gold == gold
    assert multiple_choice(record, "auto") == mc


def test_gpqa_prompt_preprocessing_and_choices():
    mc = multiple_choice(GPQA, "gpqa")
    assert mc.prompt == (
        "What is the correct answer to this question:Which gas is inert?\nChoices:\n"
        "(A) Argon. noble gas\n(B) Fluorine\n(C) Oxygen\n(D) Chlorine\nAnswer:"
    )
    assert mc.choices == [" (A)", " (B)", " (C)", " (D)"]
    assert mc.gold == 0


def test_gpqa_shuffle_deterministic_and_independent_of_position(tmp_path, tok):
    others = [{**GPQA, "Question": f"Question number {i}?"} for i in range(20)]
    orders = {multiple_choice(r, "gpqa").prompt for r in others}
    assert len(orders) > 1  # the order depends on the question
    assert {multiple_choice(r, "gpqa").gold for r in others} == {0, 1, 2, 3}
    assert any(multiple_choice(r, "gpqa", seed=1) != multiple_choice(r, "gpqa") for r in others)
    first = load(write_jsonl(tmp_path / "a.jsonl", [GPQA, *others]), tok).examples[0]
    last = load(write_jsonl(tmp_path / "b.jsonl", [*others, GPQA]), tok).examples[-1]
    assert first.tokens == last.tokens
    assert targets(tok, first) == " (A)"


@pytest.mark.parametrize(
    "record, fmt, target",
    [(MEDMCQA, "medmcqa", " B"), (MEDQA, "medqa", " C"), (MMLU, "mmlu", " B")],
)
def test_multiple_choice_tokens_and_loss_mask(tmp_path, tok, record, fmt, target):
    (ex,) = load(write_jsonl(tmp_path / "mc.jsonl", [record]), tok, format=fmt).examples
    prompt = tok.encode(multiple_choice(record, fmt).prompt)
    assert ex.tokens == prompt + tok.encode(target, add_special_tokens=False)
    assert ex.loss_mask == [0] * len(prompt) + [1] * (len(ex.tokens) - len(prompt))
    assert targets(tok, ex) == target


def test_encode_pair_splits_the_joint_encoding_like_lm_eval(tok):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A Llama-style SentencePiece BPE: encoding " A" alone gives ["▁", "▁A"].
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"], show_progress=False)
    sp.train_from_iterator(["Question: what? Answer: A B C D"] * 10, trainer=trainer)
    sp = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert len(sp.encode(" A", add_special_tokens=False)) == 2
    ctx, cont = encode_pair(sp, "Answer:", " A")
    assert ctx == sp.encode("Answer:") and sp.convert_ids_to_tokens(cont) == ["▁A"]
    assert encode_pair(tok, "Answer:", " A") == (
        tok.encode("Answer:"),
        tok.encode(" A", add_special_tokens=False),
    )
    assert encode_pair(tok, "Answer: ", "A") == encode_pair(tok, "Answer:", " A")


def test_mmlu_answer_letter_and_csv_choices(tmp_path, tok):
    rows = [
        {**MMLU, "choices": json.dumps(MMLU["choices"]), "answer": "B"},
        {**MMLU, "choices": str(MMLU["choices"]), "answer": "1"},  # pandas writes repr
    ]
    ds = load(write_csv(tmp_path / "mmlu.csv", rows), tok)
    assert ds.format == "mmlu"
    assert [targets(tok, e) for e in ds.examples] == [" B", " B"]
    assert len({tuple(e.tokens) for e in ds.examples}) == 1


# --------------------------------------------------------------------------- file types

COMPLETIONS = [
    {"prompt": "Question: which expert?", "completion": " Answer: B"},
    {"prompt": "The patient presents with", "completion": " fever and cough."},
]


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_data", "csv", "CSV"])
def test_file_types(tmp_path, tok, kind):
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n" + json.dumps(COMPLETIONS[0]) + "\n\n" + json.dumps(COMPLETIONS[1]))
        lines = [2, 4]
    elif kind.startswith("json"):
        path = tmp_path / "d.json"
        data = {"data": COMPLETIONS, "version": 1} if kind == "json_data" else COMPLETIONS
        path.write_text(json.dumps(data))
        lines = ["item 1", "item 2"]
    else:
        path, lines = write_csv(tmp_path / f"d.{kind}", COMPLETIONS), [2, 3]
    assert [s for s, _ in read_records(path)] == [f"{path}:{n}" for n in lines]
    ds = load(path, tok)
    assert (ds.name, ds.path, ds.format) == ("d", str(path), "completion")
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [targets(tok, e) for e in ds.examples] == [r["completion"] for r in COMPLETIONS]
    assert [e.source for e in ds.examples] == [f"{path}:{n}" for n in lines]
    assert ds.num_tokens() == sum(len(e.tokens) for e in ds.examples)
    assert ds.num_targets() == sum(sum(e.loss_mask) for e in ds.examples)


def test_txt_documents_separated_by_blank_lines(tmp_path, tok):
    path = tmp_path / "notes.txt"
    path.write_text("\nFirst doc line one.\nline two.\n\n  \n\nSecond doc.\n")
    records = list(read_records(path))
    assert records == [
        (f"{path}:2", {"text": "First doc line one.\nline two."}),
        (f"{path}:7", {"text": "Second doc."}),
    ]
    ds = load(path, tok)
    assert ds.format == "text"
    assert [tok.decode(e.tokens) for e in ds.examples] == [r["text"] for _, r in records]


def test_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist([MMLU, {**MMLU, "answer": 3}]), path)
    ds = load(path, tok)
    assert ds.format == "mmlu"
    assert [e.source for e in ds.examples] == [f"{path}:row 1", f"{path}:row 2"]
    assert [targets(tok, e) for e in ds.examples] == [" B", " D"]


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=rf"{path}: .*pip install pyarrow"):
        load(path, tok)


# ------------------------------------------------------------------ masks and truncation


def test_text_windows_cover_all_tokens(tmp_path, tok):
    text = "The patient presents with fever and cough. " * 12
    ds = load(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), tok, max_seq_len=16)
    ids = tok.encode(text)
    # windows overlap by one token: each token after the first is a target exactly once
    assert len(ds.examples) == -(-(len(ids) - 1) // 15) > 2
    assert ds.examples[0].tokens + sum((e.tokens[1:] for e in ds.examples[1:]), []) == ids
    assert ds.num_targets() == len(ids) - 1
    for e in ds.examples:
        assert len(e.tokens) <= 16
        assert e.loss_mask == [0] + [1] * (len(e.tokens) - 1)


def test_completion_keeps_target_and_drops_prompt_from_left(tmp_path, tok):
    prompt = "Question: which expert handles this token?" * 5
    records = [{"prompt": prompt, "completion": " B"}, {"prompt": prompt + " ", "completion": "B"}]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    examples = load(path, tok, max_seq_len=10).examples
    ids, target = tok.encode(prompt), tok.encode(" B", add_special_tokens=False)
    for ex in examples:  # a prompt's trailing space moves to the target, as in lm-eval
        assert len(ex.tokens) == 10
        assert ex.tokens == ids[-(10 - len(target)) :] + target
        assert targets(tok, ex) == " B"
        assert ex.loss_mask == [0] * (10 - len(target)) + [1] * len(target)


def test_too_long_completion_is_cut_at_the_right(tmp_path, tok):
    record = {"prompt": "Question:", "completion": " fever and cough." * 10}
    (ex,) = load(write_jsonl(tmp_path / "c.jsonl", [record]), tok, max_seq_len=8).examples
    target = tok.encode(record["completion"], add_special_tokens=False)
    assert ex.tokens == tok.encode("Question:")[-1:] + target[:7]
    assert ex.loss_mask == [0] + [1] * 7


def test_chat_masks_assistant_turns(tmp_path, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Which expert?"},
        {"role": "assistant", "content": "Expert B."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Expert A."},
    ]
    (ex,) = load(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tok).examples
    assert ex.tokens == tok.apply_chat_template(messages, tokenize=True)
    spans, start = [], None
    for i, m in enumerate([*ex.loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(tok.decode(ex.tokens[start:i]))
            start = None
    assert spans == ["Expert B.<|im_end|>\n", "Expert A.<|im_end|>\n"]
    cut = ex.loss_mask.index(1) + 3
    (short,) = load(tmp_path / "chat.jsonl", tok, max_seq_len=cut).examples
    assert short.tokens == ex.tokens[:cut] and short.loss_mask == ex.loss_mask[:cut]


def test_plain_hf_tokenizer_gives_the_same_examples(tmp_path, tok, model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": "Which expert?"}, {"role": "assistant", "content": "B"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    assert load(path, hf).examples == load(path, tok).examples
    path = write_jsonl(tmp_path / "mc.jsonl", [MEDMCQA])
    assert load(path, hf).examples == load(path, tok).examples


class UnstableChat:
    """A tokenizer whose chat rendering of a prefix is not a prefix of the full one."""

    chat_template = "unstable"

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        return [len(messages)] * (len(messages) + 1) + [9] * add_generation_prompt


def test_chat_template_not_prefix_stable(tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    with pytest.raises(DataError, match=rf"{path}:1: the chat template is not prefix-stable"):
        load(path, UnstableChat())


def test_chat_message_without_role(tmp_path, tok):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"content": "yo"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(DataError, match=rf"{path}:1: message 2: expected .*'role'"):
        load(path, tok)


# ---------------------------------------------------------------------- auto detection


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": []}, "chat"),
        ({"prompt": "a", "completion": "b"}, "completion"),
        ({"text": "a", "meta": 1}, "text"),
        (MEDMCQA, "medmcqa"),
        (MEDQA, "medqa"),
        (MMLU, "mmlu"),
        (GPQA, "gpqa"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_undetectable_format_lists_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=rf"{path}:1: cannot detect .*found fields: foo, bar"):
        load(path, tok)


# ------------------------------------------------------------------------------- errors


def test_missing_field_names_file_line_and_fields(tmp_path, tok):
    path = tmp_path / "m.jsonl"
    bad = {k: v for k, v in MEDMCQA.items() if k != "opa"}
    path.write_text(json.dumps(MEDMCQA) + "\n\n" + json.dumps(bad) + "\n")
    msg = rf"{path}:3: missing field 'opa' for format medmcqa \(found fields: question, opb"
    with pytest.raises(DataError, match=msg):
        load(path, tok, format="medmcqa")


def test_csv_and_json_error_locations(tmp_path, tok):
    rows = [{**MMLU, "choices": json.dumps(MMLU["choices"])}] * 2
    path = write_csv(tmp_path / "c.csv", [rows[0], {**rows[1], "answer": "E"}])
    with pytest.raises(DataError, match=rf"{path}:3: field 'answer' .*A-D, found 'E'"):
        load(path, tok)
    path = tmp_path / "j.json"
    path.write_text(json.dumps({"data": [MEDQA, {k: v for k, v in MEDQA.items() if k != "sent1"}]}))
    with pytest.raises(DataError, match=rf"{path}:item 2: missing field 'sent1' for format medqa"):
        load(path, tok)


@pytest.mark.parametrize(
    "record, fmt, match",
    [
        ({**MEDMCQA, "cop": 7}, "medmcqa", r"'cop' .*0-3 .*numbers options 1-4.*found 7"),
        ({**MEDMCQA, "cop": 4}, "medmcqa", r"subtract 1\), found 4"),
        ({**MEDQA, "label": -1}, "medqa", r"'label' for format medqa: expected .*found -1"),
        ({**MMLU, "choices": ["a", "b", "c"]}, "mmlu", r"'choices' .*4 strings, found \['a'"),
        ({**MMLU, "answer": True}, "mmlu", r"'answer' .*found True"),
        ({**MEDQA, "ending1": 3}, "medqa", r"'ending1' .*a string, found 3"),
        ({**GPQA, "Correct Answer": 5}, "gpqa", r"'Correct Answer' .*a string, found 5"),
        ({"prompt": "a", "completion": None}, "completion", r"'completion' .*found None"),
    ],
)
def test_bad_values(tmp_path, tok, record, fmt, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=rf"{path}:1: .*{match}"):
        load(path, tok, format=fmt)


def test_invalid_json_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(COMPLETIONS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load(path, tok)


def test_unknown_extension_empty_file_and_unknown_format(tmp_path, tok):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=rf"{path}: unsupported .*\.jsonl, \.json, \.csv"):
        load(path, tok)
    for name, content in [("e.jsonl", "\n\n"), ("e.txt", ""), ("e.json", "[]")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=rf"{tmp_path / name}: no examples"):
            load(tmp_path / name, tok)
    path = write_jsonl(tmp_path / "empty_texts.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(DataError, match="no examples"):
        load(path, tok)
    with pytest.raises(DataError, match="unknown format 'qa'"):
        load(path, tok, format="qa")
    with pytest.raises(DataError, match="not a multiple-choice format"):
        multiple_choice(COMPLETIONS[0], "completion")


# ------------------------------------------------------------------- order and subsets


def test_shuffle_determinism_and_max_examples(tmp_path, tok):
    records = [{"prompt": f"Question {i}:", "completion": f" {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "many.jsonl", records)

    def order(**kwargs):
        return [targets(tok, e) for e in load_dataset(path, tok, **kwargs).examples]

    in_file = [f" {i}" for i in range(30)]
    assert order(shuffle=False) == in_file
    shuffled = order(seed=0)
    assert shuffled == order(seed=0) and sorted(shuffled) == sorted(in_file)
    assert shuffled != in_file and order(seed=1) != shuffled
    first_five = order(seed=0, max_examples=5)  # the first five of the file, shuffled
    assert sorted(first_five) == sorted(in_file[:5]) and first_five != in_file[:5]
    assert order(shuffle=False, max_examples=3) == in_file[:3]
    ds = load_dataset(path, tok, max_examples=4)
    assert isinstance(ds, Dataset) and len(ds.examples) == 4
