"""Local lm-evaluation-harness tasks over a text file: no hub, the data beside the task YAML.

``python -m psm_train.hf.lm_eval_tasks FILE --out DIR`` writes into DIR

- ``<name>_rolling.yaml`` + ``<name>_documents.jsonl``: the file's documents (as
  `psm_train.pretrained.text_perplexity.documents` cuts them) as a ``loglikelihood_rolling`` task;
  its word perplexity is what ``psm-train eval MODEL --text FILE`` prints;
- ``<name>_choice.yaml`` + ``<name>_choice.jsonl``: a multiple-choice task built from the same
  documents: a line's opening words, then its true next words against the same number of words
  from other lines.

Run them with ``lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True
--include_path DIR --tasks <name>_rolling,<name>_choice``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from psm_train.pretrained.text_perplexity import documents

ROLLING_TASK = """task: {name}_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: loglikelihood_rolling
validation_split: validation
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

CHOICE_TASK = """task: {name}_choice
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def choice_items(docs: list[str], items: int, context_words: int = 8, answer_words: int = 4, choices: int = 4,
                 seed: int = 0) -> list[dict]:
    """Multiple-choice items: {"context", "choices", "gold"} from lines of at least context + answer words."""
    rng = random.Random(seed)
    lines = [line.split() for doc in docs for line in doc.splitlines()]
    lines = [w for w in lines if len(w) >= context_words + answer_words and w[0] != "="]
    if len(lines) < choices:
        raise ValueError(f"only {len(lines)} lines of {context_words + answer_words}+ words: too few for {choices} choices")
    out = []
    for i in rng.sample(range(len(lines)), min(items, len(lines))):
        others = rng.sample([j for j in range(len(lines)) if j != i], choices - 1)
        answers = [" ".join(lines[j][context_words : context_words + answer_words]) for j in [i, *others]]
        order = list(range(choices))
        rng.shuffle(order)
        out.append({"context": " ".join(lines[i][:context_words]), "choices": [answers[k] for k in order],
                    "gold": order.index(0)})
    return out


def write_tasks(text_file: str | Path, out: str | Path, name: str, items: int = 200) -> list[str]:
    """Write the two tasks (YAML and JSONL) for ``text_file`` into ``out``; returns the task names."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = documents(Path(text_file).read_text(encoding="utf-8"))
    rolling, choice = out / f"{name}_documents.jsonl", out / f"{name}_choice.jsonl"
    rolling.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    choice.write_text("".join(json.dumps(item) + "\n" for item in choice_items(docs, items)))
    (out / f"{name}_rolling.yaml").write_text(ROLLING_TASK.format(name=name, data=rolling))
    (out / f"{name}_choice.yaml").write_text(CHOICE_TASK.format(name=name, data=choice))
    return [f"{name}_rolling", f"{name}_choice"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m psm_train.hf.lm_eval_tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text_file")
    p.add_argument("--out", required=True, help="directory for the task YAML and data (lm_eval --include_path)")
    p.add_argument("--name", default="local_text", help="task name prefix")
    p.add_argument("--items", type=int, default=200, help="multiple-choice items")
    args = p.parse_args(argv)
    names = write_tasks(args.text_file, args.out, args.name, args.items)
    print(f"wrote {', '.join(names)} to {args.out}")


if __name__ == "__main__":
    main()
