set -x
timeout 200 python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_fp8_experts.py tests/test_gpu_mla_decode.py -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -4 $OUT/gpu_tests.txt
python -c "from tests.distributed.compose import make_inputs; make_inputs('/tmp/c')"
A="--preset small --data /tmp/c/corpus --tokenizer /tmp/c/tok --steps 24 --batch-size 8 --seq-len 1024 --device cuda --no-progress --samples 0 --eval-every 0 --save-every 0 --cache-dir /tmp/cache"
for t in new base; do
  if [ $t = new ]; then d=.; else d=_base; fi
  for v in "--precision bf16" "--precision bf16 --compile --optim-state bf16 --recompute selective" "--precision fp8"; do
    n=$(echo "$v" | tr -d ' -'); rm -rf /tmp/r_$t_$n
    (cd $d && PYTHONPATH=. timeout 240 python -m dsv3.cli train $A $v --out /tmp/r_${t}_$n) > $OUT/loop_${t}_$n.txt 2>&1
    python -c "
import json,sys; r=[json.loads(l) for l in open('/tmp/r_${t}_$n/metrics.jsonl')]; s=[x for x in r if 'tok_per_s' in x][-12:]
print('$t', '$v', 'tok/s %.0f'%(sum(x['tok_per_s'] for x in s)/len(s)), 'main %.4f'%s[-1]['main'])" 2>&1 | tail -1
  done
done
