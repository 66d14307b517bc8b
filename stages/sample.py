"""`python -m stages.sample`, as dvc.yaml runs it: the sample stage of gptcore/stages/sample.py."""

import sys

from gptcore import stage
from gptcore.stages.sample import main

if __name__ == "__main__":
    sys.exit(stage.main(main))
