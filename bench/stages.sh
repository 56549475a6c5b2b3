# Sourced by the GPU stage scripts (bench/decode_kernels_gpu.sh, bench/train_gpu.sh) after they set `out` (the output
# directory) and `stages` (",a,b,c,"): the card's name into $out/card.txt, PYTHONPATH on the repository, and
#     step NAME COMMAND...   run COMMAND if NAME is one of the stages, its output into $out/NAME.txt, a line
#                            "NAME: exit N in S s" into $out/steps.txt; a failing stage does not stop the next
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/card.txt" 2>&1

step() {  # name, command...
    local name=$1
    shift
    [[ $stages == *",$name,"* ]] || return 0
    local t0=$SECONDS
    "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}
