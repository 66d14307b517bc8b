"""`python -m stages.verify`, as dvc.yaml runs it: the verify stage of gptcore/stages/verify.py."""

import sys

from gptcore import stage
from gptcore.stages.verify import main

if __name__ == "__main__":
    sys.exit(stage.main(main))
