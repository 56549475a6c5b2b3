set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
pip list 2>/dev/null | grep -i -E "^(pytest|hypothesis|matplotlib|tqdm|fastapi|httpx) " 
timeout 240 python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_fp8_experts.py tests/test_gpu_mla_decode.py -x -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -5 $OUT/gpu_tests.txt
for t in new base new base; do
  if [ $t = new ]; then d=.; else d=_base; fi
  (cd $d && PYTHONPATH=. timeout 150 python bench/train_speed.py --steps 6 --warmup 3) > $OUT/speed_$t.txt 2>&1
  tail -8 $OUT/speed_$t.txt
done
