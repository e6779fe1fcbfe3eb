#!/usr/bin/env bash
# One GPU check, at most ~8 minutes on one H100/H200 (every step has a time limit under an
# overall budget): (a) the E-step against azula (MMPS, DDPM, CG k=1 as conf/sampler/mmps.yaml,
# the ~9M U-Net at 32x32, B=1024, 64 steps) in fp32, bf16 (network-only autocast + TF32) and
# bf16 + torch.compile;
# (b) DSM training throughput against azula (same network and batch; fp32, bf16,
# bf16 + compile); (c) a shrunk 2-round `experiment=mnist_shift` EM run on CUDA. It writes
# benchmarks/results/<card>.md (card from nvidia-smi, sanitised) with the tables, the targets
# and the environment (torch, CUDA, driver).
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run (or DRY_RUN=1): the same steps with tiny sizes on the CPU (no bf16/compile rows),
# in about a minute on an idle core; writes DIR/dry-run-cpu.md. Environment: PYTHON (default
# python), BUDGET_S (overall seconds, default 470), ESTEP_STEPS / ESTEP_BATCH / TRAIN_BATCH.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out_dir="$here/results"
dry="${DRY_RUN:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out_dir="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
py="${PYTHON:-python}"
budget="${BUDGET_S:-470}"
cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out_dir" || exit 2
work="$(mktemp -d -t gpu_check.XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

if [ "$dry" = 1 ]; then
  card="dry-run-cpu"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  dev=(--device cpu)
  estep_size=(--size small --batch "${ESTEP_BATCH:-8}" --steps "${ESTEP_STEPS:-4}" --threads 1)
  train_size=(--size small --batch "${TRAIN_BATCH:-8}" --warmup 1 --steps 2 --threads 1)
  variants=("fp32:")
  em_args=(--dry-run)
else
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: CUDA is not available (use --dry-run for the CPU mode)" >&2
    exit 2
  fi
  name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
  [ -n "$name" ] || name="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')"
  card="$(printf '%s' "$name" | tr ' /' '__' | tr -cd 'A-Za-z0-9._-')"
  dev=(--device cuda)
  estep_size=(--size gpu --batch "${ESTEP_BATCH:-1024}" --steps "${ESTEP_STEPS:-64}")
  train_size=(--size gpu --batch "${TRAIN_BATCH:-1024}" --warmup 3 --steps 10)
  variants=("fp32:" "bf16:--bf16" "bf16 + torch.compile:--bf16 --compile")
  em_args=()
fi
report="$out_dir/$card.md"

# run_step LOG CAP RESERVE CMD...: runs CMD with a time limit of min(CAP, what the budget
# leaves after RESERVE seconds kept for the later steps); status 124 = timed out
run_step() {
  local log="$1" cap="$2" reserve="$3"
  shift 3
  local left=$((budget - (SECONDS - start) - reserve))
  [ "$left" -lt "$cap" ] && cap="$left"
  if [ "$cap" -lt 10 ]; then
    echo "skipped: the time budget ($budget s) is spent" >"$log"
    return 125
  fi
  echo "[$((SECONDS - start)) s] $* (limit ${cap} s)"
  timeout --signal=TERM --kill-after=10 "$cap" "$@" >"$log" 2>&1
}

# section FILE LOG STATUS: the table a step wrote, or why there is none with its log's tail
section() {
  if [ "$3" = 0 ] && [ -s "$1" ]; then
    cat "$1"
  else
    case "$3" in
      124|137) echo "**timed out** (status $3); last lines of its log:" ;;
      125) echo "**skipped**: the time budget ($budget s) was spent." ;;
      *) echo "**failed** (status $3); last lines of its log:" ;;
    esac
    [ "$3" = 125 ] || { echo '```'; tail -n 15 "$2"; echo '```'; }
  fi
  echo
}

estep_common=(--methods mmps --solvers cg --sampler ddpm --no-nfe --repeats 1 --no-net-time)
declare -a estep_status train_status
i=0
for v in "${variants[@]}"; do
  flags=(${v#*:})
  reserve=$(( (${#variants[@]} - i - 1) * 60 + 200 ))
  run_step "$work/estep_$i.log" 180 "$reserve" "$py" benchmarks/estep.py "${dev[@]}" \
    "${estep_size[@]}" "${estep_common[@]}" "${flags[@]}" --out "$work/estep_$i.md"
  estep_status[$i]=$?
  i=$((i + 1))
done
i=0
for v in "${variants[@]}"; do
  flags=(${v#*:})
  reserve=$(( (${#variants[@]} - i - 1) * 30 + 150 ))
  run_step "$work/train_$i.log" 120 "$reserve" "$py" benchmarks/training.py "${dev[@]}" \
    "${train_size[@]}" "${flags[@]}" --out "$work/train_$i.md"
  train_status[$i]=$?
  i=$((i + 1))
done
run_step "$work/em.log" 200 0 "$py" benchmarks/em_run.py "${em_args[@]}" \
  --workdir "$work/em" --out "$work/em.md"
em_status=$?

# targets: hierprior / azula of every hierprior row next to the target ratio
summary() {  # summary FILE LABEL WHAT
  [ -s "$1" ] || return 0
  "$py" - "$1" "$2" "$3" <<'EOF'
import sys
path, label, what = sys.argv[1:]
col = None
for line in open(path):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if "hierprior / azula" in cells:
        col = cells.index("hierprior / azula")
        continue
    if col is None or len(cells) <= col or not any(c.startswith("hierprior") for c in cells[:2]):
        continue
    ratio = cells[col]
    try:
        met = "met" if float(ratio) >= 3 else "not met"
    except ValueError:
        met = "no azula figure"
    head = " ".join(c for c in cells[:3] if c)
    print(f"| {what} | {label} | {head} | {ratio} | >= 3 | {met} |")
EOF
}

{
  echo "# GPU check: $card"
  echo
  if [ "$dry" = 1 ]; then
    echo "Dry run on the CPU (tiny sizes; no bf16 or torch.compile rows): it checks that every"
    echo "step runs, not how fast. Produced by \`benchmarks/gpu_check.sh --dry-run\`."
  else
    echo "Produced by \`benchmarks/gpu_check.sh\` on one $name."
  fi
  echo
  echo "## Environment"
  echo
  echo '```'
  "$py" - <<'EOF'
import platform, subprocess
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA (torch)",
      torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
try:
    import azula
    print("azula", azula.__version__)
except ImportError:
    print("azula: not importable (its rows are skipped)")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    try:
        q = "--query-gpu=name,driver_version,clocks.max.sm,power.limit"
        print(subprocess.run(["nvidia-smi", q, "--format=csv"], capture_output=True,
                             text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError) as err:
        print("nvidia-smi:", err)
else:
    print("CUDA: not available (CPU run)")
EOF
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ), total $((SECONDS - start)) s"
  echo '```'
  echo
  echo "## Targets"
  echo
  echo "E-step: hierprior >= 3x azula's posterior samples/s; M-step: hierprior >= 3x azula's"
  echo "training images/s (same network, batch and precision in each table)."
  echo
  echo "| step | precision | row | hierprior / azula | target | |"
  echo "| --- | --- | --- | ---: | ---: | --- |"
  i=0
  for v in "${variants[@]}"; do
    summary "$work/estep_$i.md" "${v%%:*}" "E-step"
    i=$((i + 1))
  done
  i=0
  for v in "${variants[@]}"; do
    summary "$work/train_$i.md" "${v%%:*}" "M-step"
    i=$((i + 1))
  done
  echo
  echo "## E-step: MMPS against azula"
  echo
  i=0
  for v in "${variants[@]}"; do
    echo "### ${v%%:*}"
    echo
    section "$work/estep_$i.md" "$work/estep_$i.log" "${estep_status[$i]}"
    i=$((i + 1))
  done
  echo "## M-step: DSM training against azula"
  echo
  i=0
  for v in "${variants[@]}"; do
    echo "### ${v%%:*}"
    echo
    section "$work/train_$i.md" "$work/train_$i.log" "${train_status[$i]}"
    i=$((i + 1))
  done
  echo "## EM run: shrunk mnist_shift, 2 rounds"
  echo
  section "$work/em.md" "$work/em.log" "$em_status"
} >"$report"

echo "wrote $report ($((SECONDS - start)) s)"
status=0
for s in "${estep_status[@]}" "${train_status[@]}" "$em_status"; do
  [ "$s" = 0 ] || status=1
done
exit $status
