#!/usr/bin/env python3
"""Converts downloaded benchmark files into lorakit's JSONL training format.

Standard library only. Called by scripts/fetch-data.sh, one sub-command per data set:

    prepare_data.py ner NER_FINANCE_JSONL OUT_DIR
    prepare_data.py sarcasm SARCASM_JSONL OUT_DIR
    prepare_data.py sql SPIDER_SQL_JSONL OUT_DIR
    prepare_data.py e2e TASK_JSON OUT_DIR
    prepare_data.py nli TASK_JSON OUT_DIR

writes OUT_DIR/{train,validation,test}.jsonl and prints the counts. Each line is
{"prompt": ..., "completion": ..., ...}: lorakit trains on the completion and ignores the other
keys, which `lorakit eval` uses: "references" (every reference text of the same input, for
BLEU/ROUGE/exact/SQL execution), "schema" (text-to-SQL: the SQL script that builds the
database the queries run on), "choices" (classification: the alternative completions, for
accuracy).

Splits are by input (the sentence for NER, the headline for sarcasm, the meaning
representation for E2E, the database for text-to-SQL, the claim for NLI), never by line, so that
no input is in two splits: the distinct inputs are
ordered by the SHA-256 of their text and cut 80/10/10. The order does not depend on the Python
version, the platform or a random generator (the synthetic SQL rows come from a generator
seeded by a SHA-256, and Python's `random.Random` with an integer seed is stable across
versions for the calls used here: `random()` and `randrange()`).
"""

import argparse
import hashlib
import json
import os
import random
import re
import sqlite3
import sys
from collections import OrderedDict

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)


def split_keys(keys):
    """Distinct keys -> {key: split name}, by SHA-256 order, 80/10/10 of the keys."""
    ordered = sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    n = len(ordered)
    n_train = round(n * FRACTIONS[0])
    n_val = round(n * FRACTIONS[1])
    out = {}
    for i, k in enumerate(ordered):
        out[k] = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
    return out


def clean(text):
    """Collapses runs of whitespace (the E2E references hold stray double spaces)."""
    return " ".join(text.split())


def write_splits(out_dir, rows_by_split):
    os.makedirs(out_dir, exist_ok=True)
    for split in SPLITS:
        with open(os.path.join(out_dir, split + ".jsonl"), "w", encoding="utf-8") as f:
            for row in rows_by_split[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evals_samples(jsonl, roles=("system", "user")):
    """An openai evals samples file -> [(content of each message, ..., ideal)], checking that
    every line has one message per role in `roles`, in that order, and a text ideal."""
    out = []
    with open(jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            msgs = ex.get("input")
            ok = isinstance(msgs, list) and isinstance(ex.get("ideal"), str)
            ok = ok and [m.get("role") for m in msgs] == list(roles)
            if not ok:
                raise ValueError(f"{jsonl}:{n}: unexpected example {line[:120]!r}")
            out.append((*(m["content"] for m in msgs), ex["ideal"]))
    return out


# --- Named entities in financial documents (openai evals, ner_finance) -------------------

NER_SYSTEM_START = "The following sentence is from a financial document."


def ner_prompt(sentence):
    # The evals prompt asks a chat model for its reasoning first; a fine-tuned model answers
    # directly, so the prompt keeps only the task and the answer format. As for E2E, the
    # completion starts with a space and the prompt ends without one.
    return (
        "List the named entities (PERSON, ORGANIZATION, LOCATION) in this sentence from a "
        f"financial document, or say 'No entities found'.\nSentence: {sentence}\nEntities:"
    )


def prepare_ner(jsonl, out_dir):
    # Sentence -> its answers, in file order (a few sentences repeat; one repeat disagrees with
    # itself, so every answer is kept as a reference).
    answers = OrderedDict()
    for system, user, ideal in evals_samples(jsonl):
        if not system.startswith(NER_SYSTEM_START):
            raise ValueError(f"{jsonl}: unexpected instruction {system[:80]!r}")
        sentence, ideal = clean(user), clean(ideal)
        if not sentence or not ideal:
            raise ValueError(f"{jsonl}: empty sentence or answer: {user[:80]!r} -> {ideal!r}")
        refs = answers.setdefault(sentence, [])
        if ideal not in refs:
            refs.append(ideal)
    split_of = split_keys(list(answers))
    rows = {s: [] for s in SPLITS}
    for sentence, refs in answers.items():
        for ideal in refs:
            rows[split_of[sentence]].append(
                {"prompt": ner_prompt(sentence), "completion": " " + ideal, "references": refs}
            )
    write_splits(out_dir, rows)
    for s in SPLITS:
        none = sum(r["completion"] == " No entities found" for r in rows[s])
        print(f"ner {s}: {len(rows[s])} examples, {none} with no entity", file=sys.stderr)
    print(f"ner total: {len(answers)} distinct sentences", file=sys.stderr)


# --- Sarcasm in news headlines (openai evals, sarcasm) ------------------------------------

SARCASM_LABELS = {"1": "yes", "0": "no"}
# Examples kept per split: the file has 28,614 headlines; these are the first in SHA-256 order.
SARCASM_KEEP = {"train": 4000, "validation": 500, "test": 1000}


def prepare_sarcasm(jsonl, out_dir):
    label_of = OrderedDict()
    for _, user, ideal in evals_samples(jsonl):
        headline = clean(user)
        if ideal not in SARCASM_LABELS or not headline:
            raise ValueError(f"{jsonl}: unexpected example {user[:80]!r} -> {ideal!r}")
        if label_of.setdefault(headline, ideal) != ideal:
            raise ValueError(f"{jsonl}: headline {headline[:80]!r} has two labels")
    split_of = split_keys(list(label_of))
    ordered = sorted(label_of, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    rows = {s: [] for s in SPLITS}
    choices = [" " + label for label in SARCASM_LABELS.values()]
    for headline in ordered:
        s = split_of[headline]
        if len(rows[s]) < SARCASM_KEEP[s]:
            label = SARCASM_LABELS[label_of[headline]]
            prompt = f"Is this news headline sarcastic? Answer yes or no.\nHeadline: {headline}\nAnswer:"
            rows[s].append({"prompt": prompt, "completion": " " + label, "choices": choices})
    write_splits(out_dir, rows)
    for s in SPLITS:
        yes = sum(r["completion"] == " yes" for r in rows[s])
        print(f"sarcasm {s}: {len(rows[s])} examples, {yes} sarcastic", file=sys.stderr)
    print(f"sarcasm total: {len(label_of)} distinct headlines in the source", file=sys.stderr)


# --- E2E NLG (BIG-bench gem/e2e_nlg) -----------------------------------------------------

E2E_KEYS = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)


def e2e_mr(text):
    """'name: Blue Spice, eatType: coffee shop' -> 'name[Blue Spice], eatType[coffee shop]',
    the E2E data set's own notation. Fails on anything it does not recognise."""
    parts = []
    for item in text.split(", "):
        key, sep, value = item.partition(": ")
        if not sep or key not in E2E_KEYS or not value or ": " in value or "[" in value:
            raise ValueError(f"unexpected meaning representation {text!r} (item {item!r})")
        parts.append(f"{key}[{value}]")
    return ", ".join(parts)


def e2e_prompt(mr):
    # The prompt ends without a space; the completion starts with one, which byte-level BPE
    # tokenisers join to its first word (" The"), as in running text. lorakit tokenises
    # prompt and completion separately, so this boundary is always a token boundary.
    return f"Meaning representation: {mr}\nDescription:"


def prepare_e2e(task_json, out_dir):
    with open(task_json, encoding="utf-8") as f:
        task = json.load(f)
    examples = task["examples"]
    # Meaning representation -> its references, in file order.
    refs = OrderedDict()
    for ex in examples:
        if not isinstance(ex.get("input"), str) or not isinstance(ex.get("target"), str):
            raise ValueError(f"unexpected example {ex!r}")
        mr = e2e_mr(ex["input"].strip())
        target = clean(ex["target"])
        if target:
            refs.setdefault(mr, []).append(target)
    split_of = split_keys(list(refs))
    rows = {s: [] for s in SPLITS}
    for mr, targets in refs.items():
        prompt = e2e_prompt(mr)
        for t in targets:
            rows[split_of[mr]].append({"prompt": prompt, "completion": " " + t, "references": targets})
    write_splits(out_dir, rows)
    total_mrs = len(refs)
    for s in SPLITS:
        mrs = sum(1 for v in split_of.values() if v == s)
        print(f"e2e {s}: {len(rows[s])} examples, {mrs} meaning representations", file=sys.stderr)
    print(
        f"e2e total: {sum(len(r) for r in rows.values())} examples, {total_mrs} meaning representations",
        file=sys.stderr,
    )


# --- Text-to-SQL (openai evals, Spider subset) ---------------------------------------------

SQL_HEADER = "Use only the following tables and columns:\n"
SQL_TABLE = re.compile(r"^Table: (\w+)\. Columns: (.*)$")
SQL_COLUMN = re.compile(r"^(.+?) \((\w+)\)$")
# Spider's column types as the evals prompt writes them -> SQLite column affinity.
SQL_TYPES = {"number": "NUMERIC", "text": "TEXT", "time": "TEXT", "others": "TEXT"}
# Rows per table in the synthetic database.
SQL_ROWS = 12


def sql_quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


def sql_quote_value(v):
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return repr(v)


def sql_parse_schema(text):
    """'Table: t. Columns: a (number), b (text)' lines -> [(table, [(column, type)])]."""
    tables = []
    for line in text.strip().split("\n"):
        m = SQL_TABLE.match(line)
        if not m:
            raise ValueError(f"unexpected schema line {line!r}")
        cols = []
        for item in m.group(2).split(", "):
            c = SQL_COLUMN.match(item)
            if not c:
                raise ValueError(f"unexpected column {item!r} in {line!r}")
            cols.append((c.group(1), c.group(2)))
        tables.append((m.group(1), cols))
    return tables


def sql_literals(queries):
    """The string and number literals of the reference queries: the synthetic rows use them,
    so that WHERE clauses and joins select something."""
    strings, numbers = set(), set()
    for q in queries:
        for s in re.findall(r"'((?:[^']|'')*)'|\"([^\"]*)\"", q):
            v = (s[0] or s[1]).replace("''", "'")
            if v and "%" not in v:
                strings.add(v)
            elif "%" in v and v.strip("%"):
                strings.add(v.strip("%"))
        for n in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])", q):
            numbers.add(float(n) if "." in n else int(n))
    return sorted(strings), sorted(numbers)


def sql_script(tables, queries, seed_text):
    """CREATE TABLE statements and SQL_ROWS seeded random rows per table, as one SQL script.
    Values come from small pools (the queries' literals, a few words, the numbers 1..6) so that
    equality joins match and aggregates differ between right and wrong queries."""
    rng = random.Random(int(hashlib.sha256(seed_text.encode("utf-8")).hexdigest()[:16], 16))
    strings, numbers = sql_literals(queries)
    text_pool = strings + ["alpha", "beta", "gamma", "delta"]
    num_pool = numbers + [1, 2, 3, 4, 5, 6]
    lines = []
    for table, cols in tables:
        # sqlite_sequence is SQLite's own bookkeeping table: it cannot be created by hand.
        if table.lower() == "sqlite_sequence":
            continue
        defs = ", ".join(f"{sql_quote_ident(c)} {SQL_TYPES.get(t, 'TEXT')}" for c, t in cols)
        lines.append(f"CREATE TABLE {sql_quote_ident(table)} ({defs});")
        for _ in range(SQL_ROWS):
            values = []
            for _c, t in cols:
                pool = num_pool if t == "number" else text_pool
                values.append(pool[rng.randrange(len(pool))])
            lines.append(
                f"INSERT INTO {sql_quote_ident(table)} VALUES ({', '.join(sql_quote_value(v) for v in values)});"
            )
    return "\n".join(lines) + "\n"


def prepare_sql(jsonl, out_dir):
    rows_in = []
    for content, ideal in evals_samples(jsonl, roles=("system",)):
        _, sep, rest = content.partition(SQL_HEADER)
        schema_text, sep2, question = rest.partition("\n\nQuestion: ")
        if not sep or not sep2:
            raise ValueError(f"{jsonl}: no schema or question in {content[:80]!r}")
        rows_in.append((schema_text.strip(), clean(question), ideal.strip()))
    # Database (its schema text) -> its examples, in file order.
    dbs = OrderedDict()
    for schema_text, question, query in rows_in:
        dbs.setdefault(schema_text, []).append((question, query))
    split_of = split_keys(list(dbs))
    rows = {s: [] for s in SPLITS}
    nonempty = 0
    for schema_text, exs in dbs.items():
        tables = sql_parse_schema(schema_text)
        script = sql_script(tables, [q for _, q in exs], schema_text)
        db = sqlite3.connect(":memory:")
        db.executescript(script)
        for question, query in exs:
            # Every reference must run on its database; count those with a non-empty result.
            try:
                result = db.execute(query).fetchall()
            except sqlite3.Error as e:
                raise ValueError(f"reference query {query!r} fails on its database: {e}")
            nonempty += bool(result) and result != [(0,)] and result != [(None,)]
            prompt = f"Tables:\n{schema_text}\nQuestion: {question}\nSQLite query:"
            rows[split_of[schema_text]].append(
                {"prompt": prompt, "completion": " " + query, "references": [query], "schema": script}
            )
        db.close()
    write_splits(out_dir, rows)
    for s in SPLITS:
        n_db = sum(1 for v in split_of.values() if v == s)
        print(f"sql {s}: {len(rows[s])} examples, {n_db} databases", file=sys.stderr)
    print(
        f"sql total: {len(rows_in)} examples, {len(dbs)} databases; "
        f"{nonempty} reference queries return a non-empty, non-zero result on the synthetic rows",
        file=sys.stderr,
    )


# --- NLI: VitaminC fact verification (BIG-bench) ----------------------------------------

NLI_LABELS = ("True", "False", "Neither")
# Examples kept per split: the data set has 54,668; these are the first ones in claim order.
NLI_KEEP = {"train": 4000, "validation": 500, "test": 1000}


def prepare_nli(task_json, out_dir):
    with open(task_json, encoding="utf-8") as f:
        task = json.load(f)
    prefix = task["task_prefix"]
    in_prefix = task["example_input_prefix"].lstrip("\n")
    out_prefix = task["example_output_prefix"].strip()
    # Claim -> [(input, label)], in file order.
    by_claim = OrderedDict()
    for i, ex in enumerate(task["examples"]):
        scores = ex.get("target_scores")
        text = ex.get("input")
        if not isinstance(text, str) or not isinstance(scores, dict) or tuple(scores) != NLI_LABELS:
            raise ValueError(f"unexpected example {i}: {ex!r}")
        labels = [k for k, v in scores.items() if v == 1]
        passage, sep, claim = text.partition("\nClaim: ")
        if len(labels) != 1 or not sep:
            raise ValueError(f"unexpected example {i}: {ex!r}")
        by_claim.setdefault(claim.strip(), []).append((text.strip(), labels[0]))
    split_of = split_keys(list(by_claim))
    ordered = sorted(by_claim, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    rows = {s: [] for s in SPLITS}
    choices = [" " + label for label in NLI_LABELS]
    for claim in ordered:
        s = split_of[claim]
        for text, label in by_claim[claim]:
            if len(rows[s]) >= NLI_KEEP[s]:
                break
            prompt = f"{prefix}{in_prefix}{text}\n{out_prefix}"
            rows[s].append({"prompt": prompt, "completion": " " + label, "choices": choices})
    write_splits(out_dir, rows)
    for s in SPLITS:
        counts = {label: sum(r["completion"] == " " + label for r in rows[s]) for label in NLI_LABELS}
        print(f"nli {s}: {len(rows[s])} examples {counts}", file=sys.stderr)
    print(f"nli total: {len(task['examples'])} examples, {len(by_claim)} claims in the source", file=sys.stderr)


# Sub-command -> (what it reads, its converter (SOURCE, OUT_DIR)).
DATASETS = {
    "ner": ("financial-document NER from openai evals' registry/data/ner_finance", prepare_ner),
    "sarcasm": ("headline sarcasm from openai evals' registry/data/sarcasm", prepare_sarcasm),
    "sql": ("text-to-SQL from openai evals' registry/data/sql/spider_sql.jsonl", prepare_sql),
    "e2e": ("E2E NLG from BIG-bench gem/e2e_nlg/task.json", prepare_e2e),
    "nli": ("VitaminC fact verification from BIG-bench's task.json", prepare_nli),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    for name, (help_text, _) in DATASETS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("source", help="the file fetch-data.sh extracted")
        p.add_argument("out_dir")
    args = ap.parse_args()
    DATASETS[args.dataset][1](args.source, args.out_dir)


if __name__ == "__main__":
    main()
