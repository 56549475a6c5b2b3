# Sourced by the GPU stage scripts (bench/decode_kernels_gpu.sh, bench/train_gpu.sh) after they set `out` (the output
# directory) and `stages` (",a,b,c,"): the card's name into $out/card.txt, PYTHONPATH on the repository, and
#     step NAME COMMAND...   run COMMAND if NAME is one of the stages, its output into $out/NAME.txt, a line
#                            "NAME: exit N in S s" into $out/steps.txt; a failing stage does not stop the next.
#                            LIMIT_NAME=S in the environment stops that stage after S seconds (exit 124), so that a
#                            device call's later stages still run inside its 10 minutes; output is unbuffered, so a
#                            stopped stage's file keeps what it printed.
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/card.txt" 2>&1

step() {  # name, command...
    local name=$1
    shift
    [[ $stages == *",$name,"* ]] || return 0
    local t0=$SECONDS limit="LIMIT_$name"
    if declare -F "$1" > /dev/null; then  # a shell function (the limit applies to commands only)
        "$@" > "$out/$name.txt" 2>&1
    else
        timeout --kill-after=10 "${!limit:-0}" "$@" > "$out/$name.txt" 2>&1
    fi
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}
