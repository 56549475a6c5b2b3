export CUDA_VISIBLE_DEVICES=""
timeout 540 python -m pytest -q -p no:cacheprovider tests/distributed/test_compose.py tests/distributed/test_paper_config.py tests/distributed/test_pipeline_dp.py 2>&1 | tail -12
