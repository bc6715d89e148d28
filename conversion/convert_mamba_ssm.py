"""Convert a mamba-ssm `MambaLMHeadModel` folder (config.json and pytorch_model.bin) into a DiffuApriel Hub folder.

    python conversion/convert_mamba_ssm.py SOURCE OUTPUT [--no-bidirectional] [--backward-init fresh] ...

The same command as `diffuapriel convert`, refusing sources of any other format (see `diffuapriel_hf.hub.convert`).
"""

import sys

from diffuapriel_hf.hub.convert import MAMBA_SSM, script_main

if __name__ == "__main__":
    sys.exit(script_main(MAMBA_SSM, __doc__))
