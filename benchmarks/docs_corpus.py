"""
A second English corpus for recipe experiments, made offline from Debian packages, so that a choice tuned on the
bundled Shakespeare is checked on different text: technical prose (the Python documentation's reStructuredText
sources and the Debian Administrator's Handbook) and many short documents (fortune cookies), unlike the 49 long
plays and poems of the bundled corpus.

  apt-get install python3-doc debian-handbook fortunes
  python benchmarks/docs_corpus.py --out /tmp/docs.jsonl
  python prepare_fineweb.py --data_files /tmp/docs.jsonl --out_dir data/corpus --prefix docs
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import os
import random
import re


def python_docs() -> list[str]:
    return [open(p, encoding="utf-8", errors="replace").read()
            for p in sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True))]


def handbook() -> list[str]:
    texts = []
    for path in sorted(glob.glob("/usr/share/doc/debian-handbook/html/en-US/*.html")):
        page = open(path, encoding="utf-8", errors="replace").read()
        page = re.sub(r"(?s)<(script|style).*?</\1>", " ", page)
        text = html.unescape(re.sub(r"<[^>]+>", " ", page))
        texts.append(re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip())
    return texts


def fortunes() -> list[str]:
    texts = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if os.path.isfile(path) and "." not in os.path.basename(path):
            body = open(path, encoding="utf-8", errors="replace").read()
            texts += [t.strip() for t in body.split("\n%\n") if len(t.strip()) > 40]
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="jsonl file to write, one {'text': ...} per document")
    p.add_argument("--seed", type=int, default=0, help="the documents are shuffled with this seed")
    args = p.parse_args()
    docs = [d for d in python_docs() + handbook() + fortunes() if d]
    if not docs:
        raise SystemExit("no documents found: apt-get install python3-doc debian-handbook fortunes")
    random.Random(args.seed).shuffle(docs)
    with open(args.out, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"{len(docs):,} documents, {sum(map(len, docs)):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
