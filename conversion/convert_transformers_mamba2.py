"""Convert a transformers `Mamba2ForCausalLM` folder into a DiffuApriel Hub folder.

    python conversion/convert_transformers_mamba2.py SOURCE OUTPUT [--no-bidirectional] [--backward-init fresh] ...

The same command as `diffuapriel convert`, refusing sources of any other format (see `diffuapriel_hf.hub.convert`).
"""

import sys

from diffuapriel_hf.hub.convert import TRANSFORMERS, script_main

if __name__ == "__main__":
    sys.exit(script_main(TRANSFORMERS, __doc__))
