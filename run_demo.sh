#!/usr/bin/env bash
# End-to-end demo on the embedded moving-digits data (CPU, no network):
# install -> demo data -> codec patchify (Beam) -> glyph teacher (no download) -> k-means concepts ->
# train tiny -> kNN on digit labels vs the initial model -> PyTorch export -> PNGs.
#   ./run_demo.sh [OUT_DIR]      (default demo_out/; extra trainer flags via DEMO_TRAIN_FLAGS)
#   ./run_demo.sh --check-out DIR   only says whether DIR may be used as OUT_DIR (exit 0) or not (exit 2)
# OUT_DIR is replaced on every run, so it must be a folder this script made (it carries the marker
# file .ovenc-demo), an empty folder or a new path; relative paths are taken from the checkout.
set -euo pipefail
cd "$(dirname "$0")"
marker=.ovenc-demo

refuse() { echo "run_demo.sh: error: $*" >&2; return 2; }

# Whether "$1" may be deleted and rebuilt as the demo's output folder; touches nothing.
check_out() {
  local out=$1 abs home root
  [ -n "$out" ] || { refuse "OUT is empty"; return; }
  case "/$out/" in
    */../*) refuse "OUT '$out' has a '..' component: name the folder without it"; return ;;
  esac
  if [ -L "$out" ]; then refuse "OUT '$out' is a symbolic link: name the folder itself"; return; fi
  [ -e "$out" ] || return 0
  [ -d "$out" ] || { refuse "OUT '$out' exists and is not a folder"; return; }
  abs=$(cd "$out" && pwd -P)
  root=$(pwd -P)
  home=$(cd "${HOME:-/}" 2>/dev/null && pwd -P || echo /)
  for keep in / "$home" "$root"; do
    if [ "$abs" = "$keep" ]; then refuse "OUT '$out' is $keep (/, \$HOME or the checkout): refusing to replace it"; return; fi
  done
  if [ ! -f "$out/$marker" ] && [ -n "$(ls -A "$out")" ]; then
    refuse "OUT '$out' exists and was not made by run_demo.sh (no $marker file in it): it would be deleted; remove it yourself or pass another OUT"
    return
  fi
}

if [ "${1:-}" = "--check-out" ]; then
  [ $# -eq 2 ] || { refuse "usage: run_demo.sh --check-out DIR"; exit; }
  check_out "$2"
  exit
fi
out=${1:-demo_out}
check_out "$out" || exit
steps=${DEMO_STEPS:-600}
scripts/ensure_venv.sh
py=.venv/bin/python
# The demo runs on the CPU; naming the platform keeps JAX from probing for a TPU through libtpu.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# Only a folder carrying the marker is removed (check_out accepted it); the marker goes in first.
if [ -f "$out/$marker" ]; then rm -rf "$out"; fi
mkdir -p "$out"
echo "made by run_demo.sh; the next run replaces this folder" > "$out/$marker"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "1/7 demo data: moving handwritten digits (scikit-learn) encoded with libx264, plus stills"
$py -m data_prep.make_demo_data --output_dir "$out/data"
$py -m data_prep.make_demo_data --output_dir "$out/eval_data" --num_clips 150 --num_images 0 --seed 1

step "2/7 codec patchification (Apache Beam, DirectRunner: a worker per core)"
mkdir -p "$out/records"
for split in data eval_data; do
  $py -m data_prep.codec_patchify --input "$out/$split/list.txt" --output_dir "$out/records/$split" \
    --image_size 112 --class_labels "$out/$split/class_labels.json" 2> "$out/records/$split.log" \
    || { tail -n 30 "$out/records/$split.log"; exit 1; }
done  # Beam's worker chatter goes to $out/records/*.log; the job's summary is printed here
$py -m data_prep.visualize --input "$out/records/data" --index 0 --output "$out/selected_patches.png"

step "3/7 bootstrap teacher embeddings (no download) and spherical k-means concepts"
$py -m data_prep.glyph_teacher --records "$out/records/data" --output "$out/teacher"
$py -m data_prep.cluster --embeddings "$out/teacher" --num_clusters 32 --top_k 3 --output "$out/concepts"

# lr 5e-4, not tiny's 2e-3: on these few clips 2e-3 first collapses the embeddings and its final kNN
# then depends on Beam's record order (docs/benchmarks.md, "Demo").
step "4/7 train the tiny encoder (cluster discrimination, $steps steps); kNN on held-out digits at start and end"
$py -m ovenc_jax.main --config "ovenc_jax/configs/pretrain.py:variant=tiny,data=$out/records/data,eval_data=$out/records/eval_data" \
  --workdir "$out/train" --config.input.label_table="$out/concepts/labels.npz" \
  --config.loss.num_classes=32 --config.total_steps="$steps" --config.optim.lr=5e-4 --config.log_every=50 \
  ${DEMO_TRAIN_FLAGS:-} \
  | tee "$out/train.log"

step "5/7 export to PyTorch; run one held-out clip in PyTorch and JAX"
$py -m ovenc_jax.interop.export_torch --workdir "$out/train" --output "$out/torch"
$py - "$out" <<'EOF'
import logging, sys
import numpy as np, torch
from ovenc_format import records
from ovenc_jax.eval import embed
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import checkpoint
from ovenc_jax.interop.torch_model import OVEncoder
logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: "directory is read only"
out = sys.argv[1]
rec = next(records.read_all(f"{out}/records/eval_data"))
patches, positions = rec["patches"].reshape(1, -1, 14 * 14 * 3), rec["positions"][None]
seg = np.ones(positions.shape[:2], np.int32)
_, params = checkpoint.load_params(f"{out}/train")
enc = model_lib.encoder_from_config(embed.load_model_config(f"{out}/train"))
ref = np.asarray(enc.apply({"params": params["encoder"]}, patches, positions, seg)["pooled"])
with torch.no_grad():
  got = OVEncoder.from_pretrained(f"{out}/torch")(torch.from_numpy(patches), torch.from_numpy(positions),
                                                  segment_ids=torch.from_numpy(seg))["pooled"].numpy()
print(f"PyTorch vs JAX pooled embedding of {rec['source'].split('/')[-1]}: max abs diff {abs(got - ref).max():.2e}")
EOF

step "6/7 plots"
$py -m ovenc_jax.train.plot_metrics --workdir "$out/train" --output "$out/loss_curve.png"

step "7/7 summary"
$py - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
line = [l for l in open(f"{out}/train.log") if l.startswith("SUMMARY ")][-1]
s = json.loads(line[len("SUMMARY "):])
init, final = s["initial_eval"], s["final_eval"]
print(f"kNN top-1 on held-out digit clips: initial model {init['knn_top1']:.3f} -> trained {final['knn_top1']:.3f}")
if "linear_probe" in final:
  print(f"linear probe: initial {init['linear_probe']:.3f} -> trained {final['linear_probe']:.3f}")
print(f"training loss, mean over a log window: first {s['first_window_mean_loss']:.4f} -> "
      f"last {s['last_window_mean_loss']:.4f} ({s['final_step']} steps)")
EOF
cat <<EOF
outputs:
  demo data            $out/data, $out/eval_data
  token shards         $out/records/{data,eval_data}  (manifest.json, failures.jsonl)
  selected patches     $out/selected_patches.png
  teacher + concepts   $out/teacher, $out/concepts/labels.npz
  checkpoints, metrics $out/train  (TensorBoard: $out/train/tensorboard)
  loss curve           $out/loss_curve.png
  PyTorch export       $out/torch  (model.safetensors, config.json)
total $(( $(date +%s) - t0 ))s
EOF
