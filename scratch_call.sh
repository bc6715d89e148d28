set -e
source .gpu-env/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2:$PWD/src:$PYTHONPATH
(MAMBA_DETERMINISTIC=1 timeout 250 python3 -m pytest -m gpu -q tests -p no:cacheprovider 2>&1 | tail -4)
cd benchmarks && timeout 300 python3 ssd_kernel.py --out $OUT/ssd_kernel.json 2>&1 | grep -v -i warn | tail -20
