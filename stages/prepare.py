"""Prepare stage: turn the corpus into a character vocabulary and uint16 train/val token files.

python -m stages.prepare [--params params.yaml] [--set data.corpus=my.txt]
"""

import sys
import time

from gptcore import data, stage

SECTION = "data"


def main(argv=None) -> int:
    args = stage.parser(__doc__, SECTION).parse_args(argv)
    params = stage.load(args, SECTION)
    root = stage.workspace()
    with stage.tracked("prepare", params, [SECTION]) as run:
        t0 = time.perf_counter()
        stats = data.prepare(params.data.corpus, root / params.data.out_dir, params.data.val_fraction, root=root)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stage.write_metrics("prepare", stats, root)
        run.log_metrics(stats)
        run.set_tags({"data.corpus": params.data.corpus, "data.sha256": data.data_sha256(root / params.data.out_dir)})
    print(
        f"prepared {stats['characters']:,} characters, vocab {stats['vocab_size']}, "
        f"train {stats['train_tokens']:,} / val {stats['val_tokens']:,} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(stage.main(main))
