"""Prepare stage: tokenise the corpus (data.tokenizer: char, bpe, or a tokenizer.json) into train/val token
files, tokenizer.json and meta.json.

python -m gptcore prepare [--params params.yaml] [--set data.corpus=my.txt]
"""

import time

from gptcore import data, stage

SECTION = "data"


def parse_args(argv):
    return stage.parser(__doc__, SECTION, "python -m gptcore prepare").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = stage.load(args, SECTION)
    root = stage.workspace()
    with stage.tracked("prepare", params, [SECTION]) as run:
        t0 = time.perf_counter()
        d = params.data
        stats = data.prepare(
            d.corpus, root / d.out_dir, d.val_fraction, root=root, tokenizer=d.tokenizer, vocab_size=d.vocab_size
        )
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stage.write_metrics("prepare", stats, root)
        run.log_metrics(stats)
        run.set_tags({"data.corpus": params.data.corpus, "data.sha256": data.data_sha256(root / params.data.out_dir)})
    print(
        f"prepared {stats['characters']:,} characters, vocab {stats['vocab_size']}, "
        f"train {stats['train_tokens']:,} / val {stats['val_tokens']:,} tokens"
    )
    return 0
