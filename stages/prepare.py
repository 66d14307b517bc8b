"""`python -m stages.prepare`, as dvc.yaml runs it: the prepare stage of gptcore/stages/prepare.py."""

import sys

from gptcore import stage
from gptcore.stages.prepare import main

if __name__ == "__main__":
    sys.exit(stage.main(main))
