"""``python -m laco.train CONFIG.yaml [--resume]`` == ``laco train ...``; the form multi-process launchers take:

    accelerate launch --config_file configs/accelerate/ddp.yaml -m laco.train configs/train/tiny.yaml
"""

import sys

from laco.cli import main

if __name__ == "__main__":
    sys.argv = ["laco", "train", *sys.argv[1:]]
    main()
