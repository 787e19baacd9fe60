#!/usr/bin/env python3
"""Build tests/fixtures/tiny-tokenizer/: a 512-token tokenizer with Gemma 3's exact pipeline.

The tokenizer.json has the same structure as Gemma 3's real one (checked against the
downloaded gemma-3-270m tokenizer.json when it is present):

  normalizer      Replace " " -> "▁"                          (no prefix space is added)
  pre_tokenizer   Split " " MergedWithPrevious                (a no-op after the normalizer)
  model           BPE, byte_fallback true, fuse_unk true, unk "<unk>", no dropout,
                  no continuing_subword_prefix / end_of_word_suffix, ignore_merges false
  decoder         Sequence[Replace "▁" -> " ", ByteFallback, Fuse]
  post_processor  TemplateProcessing: single = <bos> $A, pair = <bos> $A <bos> $B
  added_tokens    the special tokens, normalized false, special true

Vocab (exactly 512 ids, to fit tests/fixtures/tiny-gemma3, vocab_size 512):
  0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <start_of_turn>, 5 <end_of_turn>   (added, special)
  6..261     <0x00>..<0xFF>                     byte fallback
  262..358   "\t", "\n", "▁" and the printable ASCII characters "!".."~"
  359..511   153 BPE merges trained below on a fixed English + medical corpus

The merges are trained by a small deterministic BPE (most frequent pair first, ties broken by
the pair's strings) over "pieces" that never cross a word / punctuation / digit boundary and
never merge digits (Gemma splits numbers into single digits). Nothing is random, so two runs
give byte-identical files.

Then transformers' AutoTokenizer loads the directory and expected.json records, for a set of
strings, the ids with and without special tokens and the decoded text, plus one rendered chat.

Run:  $HOME/.cache/rlvr/reference-venv/bin/python reference/make_tokenizer_fixture.py
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import tokenizers
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny-tokenizer"
CHAT_TEMPLATE = ROOT / "tests" / "fixtures" / "gemma-3-270m" / "chat_template.jinja"
DOWNLOADS = Path(os.environ.get("RLVR_DOWNLOADS", Path.home() / ".cache" / "rlvr" / "downloads"))
REAL_TOKENIZER = DOWNLOADS / "gemma-3-270m" / "tokenizer.json"

VOCAB_SIZE = 512
SPACE = "\u2581"  # "▁"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
ALPHABET = ["\t", "\n", SPACE] + [chr(c) for c in range(33, 127)]

CORPUS = """\
The patient is a 45-year-old man with chest pain and shortness of breath.
The patient reports pain in the left arm that started two hours ago.
Blood pressure is 150/90 and the heart rate is 110 beats per minute.
The doctor asked the patient about his medical history and current medication.
She has a history of diabetes, hypertension and high cholesterol.
The nurse gave the patient aspirin and oxygen while waiting for the test results.
An electrocardiogram showed changes that suggest a heart attack.
The treatment of infection often starts with an antibiotic.
A fever, a cough and a sore throat are common symptoms of a viral infection.
The patient should drink water and rest for three days.
Question: What is the most likely diagnosis?
Answer: The most likely diagnosis is acute myocardial infarction.
Question: Which drug is the first choice for this patient?
Answer: The first choice is metformin, unless the kidney function is low.
Let me think about the question step by step before I answer.
<think>The patient has a fever and a cough, so I think this is an infection.</think>
The answer is B.
The final answer is 4.
What is 2 + 2? The answer is 4.
If x = 3, then 2 * x + 1 = 7.
Think carefully, then give the answer in one word.
The child was treated in the hospital for two weeks.
The dose of the medicine depends on the weight of the patient.
Doctors and nurses work together to care for patients.
The blood test showed a low level of iron and a high level of sugar.
Please answer the following question about the patient.
The symptoms started after the patient took a new medication.
Pain, swelling and redness are signs of inflammation.
The patient was discharged from the hospital with a prescription.
Regular exercise and a healthy diet reduce the risk of heart disease.
The lungs, the heart and the brain need a constant supply of oxygen.
Is the answer correct? Yes, the answer is correct.
Hello, how are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog.
Reasoning: the patient is older than 40 and has chest pain, so the risk is high.
"""

PIECE = re.compile(r"\u2581?[A-Za-z]+|\u2581?[0-9]|\u2581?[^A-Za-z0-9\u2581\n]+|\u2581+|\n+")


def train_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on pieces of the normalized corpus; deterministic (ties by pair strings)."""
    pieces = Counter(PIECE.findall(corpus.replace(" ", SPACE)))
    assert all(ch in ALPHABET for p in pieces for ch in p)
    words = {tuple(p): c for p, c in pieces.items()}
    merges: list[tuple[str, str]] = []
    known = set(ALPHABET)
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                if a.lstrip(SPACE).isdigit() or b.isdigit():  # Gemma never merges digits
                    continue
                pairs[(a, b)] += c
        # a merge whose result is already a token (e.g. "▁" + "▁" -> "▁▁" twice) would be wasted
        cands = [(-c, p) for p, c in pairs.items() if p[0] + p[1] not in known]
        if not cands:
            raise SystemExit(f"corpus too small: only {len(merges)} merges")
        _, (a, b) = min(cands)
        merges.append((a, b))
        known.add(a + b)
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_tokenizer_json() -> dict:
    base = SPECIALS + BYTES + ALPHABET
    merges = train_merges(CORPUS, VOCAB_SIZE - len(base))
    vocab_list = base + [a + b for a, b in merges]
    assert len(vocab_list) == len(set(vocab_list)) == VOCAB_SIZE
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                          "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>",
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": [list(m) for m in merges],
        },
    }


def check_against_real(tj: dict) -> str:
    """Same pipeline sections and BPE flags as the real Gemma 3 tokenizer.json (if downloaded)."""
    if not REAL_TOKENIZER.is_file():
        return "real tokenizer.json not found; structure not re-checked"
    real = json.loads(REAL_TOKENIZER.read_text(encoding="utf-8"))
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert real[key] == tj[key], key
    flags = lambda m: {k: v for k, v in m.items() if k not in ("vocab", "merges")}
    assert flags(real["model"]) == flags(tj["model"])
    rv = real["model"]["vocab"]
    for t in SPECIALS[:4]:
        assert rv[t] == tj["model"]["vocab"][t], t
    real_added = {a["content"]: a for a in real["added_tokens"]}
    for a in tj["added_tokens"]:
        ra = dict(real_added[a["content"]])
        ra.pop("id")
        assert ra == {k: v for k, v in a.items() if k != "id"}, a["content"]
    return f"normalizer, pre_tokenizer, decoder, post_processor, BPE flags and added-token flags equal {REAL_TOKENIZER.name} of gemma-3-270m"


TEXTS = [
    "The patient has a fever.",
    "Hello world",
    " leading space",
    "trailing space ",
    "double  space",
    "line one\nline two\n\nline four",
    "2 + 2 = 4",
    "What is 12 * 34? Answer: 408!",
    "Café 中国",
    "",
    "<bos>The patient",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "<think>Let me think.</think> The answer is 4.",
    "\ttab\tseparated",
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tj = build_tokenizer_json()
    structure = check_against_real(tj)
    # Round-trip through the tokenizers library so the file is in its canonical serialization.
    tok = Tokenizer.from_str(json.dumps(tj))
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    tok.save(str(OUT / "tokenizer.json"), pretty=True)

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        # GemmaTokenizer defaults mask_token to "<mask>", which is not in this vocab (it would be
        # appended as id 512); null keeps the vocab at 512.
        "mask_token": None,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "model_max_length": 32768,
        "tokenizer_class": "GemmaTokenizer",
        "chat_template": CHAT_TEMPLATE.read_text(encoding="utf-8"),
    }
    (OUT / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    hf = transformers.AutoTokenizer.from_pretrained(str(OUT))
    assert len(hf) == VOCAB_SIZE, len(hf)
    raw = Tokenizer.from_file(str(OUT / "tokenizer.json"))
    cases = []
    for text in TEXTS:
        with_sp = hf(text)["input_ids"]
        plain = hf(text, add_special_tokens=False)["input_ids"]
        # transformers must agree with the bare tokenizers pipeline (it rebuilds the backend).
        assert with_sp == raw.encode(text).ids, text
        assert plain == raw.encode(text, add_special_tokens=False).ids, text
        assert max(with_sp, default=0) < VOCAB_SIZE
        cases.append({
            "text": text,
            "ids_with_special": with_sp,
            "ids_plain": plain,
            "tokens_plain": hf.convert_ids_to_tokens(plain),
            "decoded": hf.decode(plain, skip_special_tokens=False),
        })
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = hf(rendered, add_special_tokens=False)["input_ids"]
    expected = {
        "description": "tiny Gemma-3-pipeline tokenizer (vocab 512); made by reference/make_tokenizer_fixture.py",
        "vocab_size": VOCAB_SIZE,
        "special_tokens": {t: i for i, t in enumerate(SPECIALS)},
        "bos_token": hf.bos_token, "eos_token": hf.eos_token, "pad_token": hf.pad_token,
        "structure_check": structure,
        "notes": [
            "ids_with_special = tokenizer(text)['input_ids'] (add_special_tokens=True: <bos> prepended "
            "by the TemplateProcessing post-processor); ids_plain = add_special_tokens=False.",
            "Special tokens written in the text (<bos>, <start_of_turn>, ...) are matched as added "
            "tokens before the normalizer/BPE; the post-processor adds <bos> regardless, so text "
            "starting with '<bos>' gets two BOS ids.",
            "decoded = tokenizer.decode(ids_plain, skip_special_tokens=False).",
            "chat.ids = tokenizer(chat.text, add_special_tokens=False): the template already writes <bos>.",
        ],
        "cases": cases,
        "chat": {
            "messages": messages,
            "add_generation_prompt": True,
            "text": rendered,
            "ids": chat_ids,
            "tokens": hf.convert_ids_to_tokens(chat_ids),
        },
        "versions": {
            "python": sys.version.split()[0],
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "hf_tokenizer_class": type(hf).__name__,
        },
    }
    (OUT / "expected.json").write_text(
        json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({size} bytes); {structure}")
    for c in cases:
        print(repr(c["text"]), c["ids_with_special"], c["tokens_plain"], repr(c["decoded"]))
    print(repr(rendered), chat_ids)


if __name__ == "__main__":
    main()
