export CUDA_VISIBLE_DEVICES=""
python - > $OUT/compose_errors.txt 2>&1 <<'PY'
import tempfile, json
from tests.distributed.compose import *
root = tempfile.mkdtemp()
cells = [Cell('pp2_dualpipev','fp8','bf16','none')]
errs = run_cells(root, cells, timeout=200)
for k, v in errs.items(): print("==", k, v[-2500:])
for c in cells:
    if c.name not in errs:
        try: print(c.name, check(root, c))
        except AssertionError as e: print(c.name, "FAIL", e)
PY
tail -c 6000 $OUT/compose_errors.txt
