"""`python -m stages.bench`, as dvc.yaml runs it: the bench stage of gptcore/stages/bench.py."""

import sys

from gptcore import stage
from gptcore.stages.bench import main

if __name__ == "__main__":
    sys.exit(stage.main(main))
