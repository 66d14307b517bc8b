"""`python -m stages.transplant`, as dvc.yaml runs it: the transplant stage of gptcore/stages/transplant.py."""

import sys

from gptcore import stage
from gptcore.stages.transplant import main

if __name__ == "__main__":
    sys.exit(stage.main(main))
