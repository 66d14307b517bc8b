"""`python -m stages.train`, as dvc.yaml runs it: the train stage of gptcore/stages/train.py."""

import sys

from gptcore import stage
from gptcore.stages.train import main

if __name__ == "__main__":
    sys.exit(stage.main(main))
