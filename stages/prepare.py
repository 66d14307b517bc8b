"""Prepare stage: turn the corpus into a character vocabulary and uint16 train/val token files.

python stages/prepare.py [--params params.yaml]
"""

import sys
import time

from gptcore import data, stage
from gptcore.params import repo_root


def main(argv=None) -> int:
    ap = stage.parser(__doc__)
    args = ap.parse_args(argv)
    params = stage.load(args.params)
    root = repo_root()
    with stage.tracked("prepare", params, ["data"]) as run:
        t0 = time.perf_counter()
        stats = data.prepare(params.data.corpus, root / params.data.out_dir, params.data.val_fraction, root=root)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stage.write_metrics("prepare", stats, root)
        run.log_metrics(stats)
        run.set_tags({"data.sha256": stats["data_sha256"]})
    print(
        f"prepared {stats['characters']:,} characters, vocab {stats['vocab_size']}, "
        f"train {stats['train_tokens']:,} / val {stats['val_tokens']:,} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(stage.main(main))
