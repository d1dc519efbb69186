#!/usr/bin/env bash
# Launch Atlas training with `accelerate launch`. Run `./launch.sh --help` for the options.
# Relative paths (--config, --log, --accelerate_config and train.py's own) mean the folder it is started from.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<'TXT'
usage: ./launch.sh [options] [-- train.py arguments]

  --mode single|multi|cpu     one GPU, several GPUs (DDP), or CPU processes (default: single)
  --num_processes N           processes per machine: GPUs in single/multi mode, CPU processes in cpu mode
                              (default: 1; multi: 8)
  --gpus N                    the same, by its GPU name (in cpu mode it counts CPU processes: prefer --num_processes)
  --nodes N                   machines for multi-node training (default: 1)
  --node_rank R               this machine's rank (multi-node)
  --main_process_ip IP        address of rank 0 (multi-node)
  --main_process_port P       port of rank 0 (default: 29500)
  --config FILE               experiment config (default: configs/train_config.yaml of this repository)
  --accelerate_config FILE    an accelerate config (accelerate_configs/*.yaml or `accelerate config`)
  --wandb                     log to Weights & Biases (WANDB_MODE=offline works without network)
  --log FILE                  tee all output (stdout and stderr) to FILE
  --dry-run                   print the command without running it
  -h, --help                  this help

Everything after `--` goes to train.py, e.g. -- --learning_rate 1e-4 --max_train_steps 1000.
Relative paths, here and after `--`, are read against the folder you start it from.
Examples:
  ./launch.sh --wandb
  ./launch.sh --mode multi --gpus 8 --wandb --log logs/train.log
  ./launch.sh --mode cpu --num_processes 2 -- --config configs/demo.yaml
TXT
}

die() { echo "launch.sh: error: $*" >&2; echo "run ./launch.sh --help for usage" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

mode=single gpus="" gpus_flag=--gpus nodes=1 node_rank=0 main_ip="" main_port=29500
config="$repo/configs/train_config.yaml" accel_config="" wandb=0 log="" dry_run=0
train_args=()
while (($#)); do
  case "$1" in
    --mode) [[ $# -ge 2 ]] || die "--mode needs a value"; mode=$2; shift 2 ;;
    --gpus|--num_processes) [[ $# -ge 2 ]] || die "$1 needs a value"; gpus=$2; gpus_flag=$1; shift 2 ;;
    --nodes) [[ $# -ge 2 ]] || die "--nodes needs a value"; nodes=$2; shift 2 ;;
    --node_rank) [[ $# -ge 2 ]] || die "--node_rank needs a value"; node_rank=$2; shift 2 ;;
    --main_process_ip) [[ $# -ge 2 ]] || die "--main_process_ip needs a value"; main_ip=$2; shift 2 ;;
    --main_process_port) [[ $# -ge 2 ]] || die "--main_process_port needs a value"; main_port=$2; shift 2 ;;
    --config) [[ $# -ge 2 ]] || die "--config needs a value"; config=$2; shift 2 ;;
    --accelerate_config) [[ $# -ge 2 ]] || die "--accelerate_config needs a value"; accel_config=$2; shift 2 ;;
    --wandb) wandb=1; shift ;;
    --log) [[ $# -ge 2 ]] || die "--log needs a value"; log=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done

case "$mode" in single|multi|cpu) ;; *) die "--mode must be single, multi or cpu, got '$mode'" ;; esac
[[ -z "$gpus" ]] && { [[ "$mode" == multi ]] && gpus=8 || gpus=1; }
is_int "$gpus" && ((gpus >= 1)) || die "$gpus_flag must be a positive integer, got '$gpus'"
[[ "$mode" == cpu && "$gpus_flag" == --gpus && "$gpus" -gt 1 ]] &&
  echo "launch.sh: note: in cpu mode --gpus counts CPU processes; --num_processes $gpus says so" >&2
is_int "$nodes" && ((nodes >= 1)) || die "--nodes must be a positive integer, got '$nodes'"
is_int "$node_rank" && ((node_rank < nodes)) || die "--node_rank must be in 0..$((nodes - 1)), got '$node_rank'"
is_int "$main_port" || die "--main_process_port must be a port number, got '$main_port'"
((nodes == 1)) || [[ -n "$main_ip" ]] || die "--nodes $nodes needs --main_process_ip"
[[ "$mode" == single && "$gpus" -gt 1 ]] && die "--mode single runs one process; use --mode multi for $gpus_flag $gpus"
config_in_args=0
for arg in "${train_args[@]}"; do [[ "$arg" == --config || "$arg" == --config=* ]] && config_in_args=1; done
((config_in_args)) || [[ -f "$config" ]] || die "config file not found: $config"
[[ -z "$accel_config" || -f "$accel_config" ]] || die "accelerate config not found: $accel_config"

cmd=(accelerate launch)
env_prefix=()
[[ -n "$accel_config" ]] && cmd+=(--config_file "$accel_config")
case "$mode" in
  single) cmd+=(--num_processes 1) ;;
  multi) cmd+=(--multi_gpu --num_processes $((gpus * nodes)))
         ((nodes > 1)) && cmd+=(--machine_rank "$node_rank" --main_process_ip "$main_ip" --main_process_port "$main_port") ;;
  cpu) env_prefix=(ACCELERATE_USE_CPU=1)
       if ((gpus > 1)); then cmd+=(--multi_gpu --num_processes "$gpus"); else cmd+=(--cpu --num_processes 1); fi ;;
esac
cmd+=(--num_machines "$nodes")
cmd+=(--quiet "$repo/train.py")  # a trainer error is reported once, by the trainer, not again as a launcher traceback
script_args=()
((config_in_args)) || script_args+=(--config "$config")
((wandb)) && script_args+=(--wandb)
script_args+=("${train_args[@]}")
cmd+=("${script_args[@]}")

echo "+ ${env_prefix[*]:+${env_prefix[*]} }${cmd[*]}"
((dry_run)) && exit 0
# a mistyped flag, a bad config value or a missing data source: one error line now, before any process or
# launcher starts (the package from this repository, also where it is not installed)
help_asked=0
for arg in "${script_args[@]}"; do [[ "$arg" == -h || "$arg" == --help ]] && help_asked=1; done
((help_asked)) || PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python -m atlas_vla.config "${script_args[@]}" || exit 2
# Train in the background in a process group of its own, forward SIGTERM/SIGINT/SIGUSR1 to it, and
# wait for every process of the group: `accelerate launch` does not forward signals and may die
# before the trainer it started has saved its checkpoint. The trainer writes to the stop file when a
# signal stopped it after saving; this script then exits 75 (EX_TEMPFAIL: resume with `latest`).
stop_file=$(mktemp "${TMPDIR:-/tmp}/atlas-vla-stop.XXXXXX")
trap 'rm -f "$stop_file"' EXIT
set -m
if [[ -n "$log" ]]; then
  mkdir -p "$(dirname "$log")"
  env ATLAS_VLA_STOP_FILE="$stop_file" "${env_prefix[@]}" "${cmd[@]}" > >(tee -a "$log") 2>&1 &
else
  env ATLAS_VLA_STOP_FILE="$stop_file" "${env_prefix[@]}" "${cmd[@]}" &
fi
child=$!
set +m
# to the processes the launcher started (the ranks), so the launcher sees them finish; to the whole group
# when there are none yet or pkill is missing
for sig in TERM INT USR1; do
  trap "pkill -$sig -P $child 2>/dev/null || kill -s $sig -- -$child 2>/dev/null || true" "$sig"
done
while :; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break  # wait also returns when a trapped signal arrives
done
while kill -0 -- "-$child" 2>/dev/null; do sleep 0.2; done
[[ -s "$stop_file" ]] && exit 75
exit "$status"
