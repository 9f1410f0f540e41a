#!/usr/bin/env bash
# End-to-end demo on the embedded moving-digits data (CPU, no network):
# install -> demo data -> codec patchify (Beam) -> bootstrap teacher -> k-means concepts ->
# train tiny -> kNN on digit labels vs the initial model -> PyTorch export -> PNGs.
#   ./run_demo.sh [OUT_DIR]      (default demo_out/; extra trainer flags via DEMO_TRAIN_FLAGS)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-demo_out}
steps=${DEMO_STEPS:-300}
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if ! cmp -s requirements.txt .venv/.requirements.installed; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi
py=.venv/bin/python
rm -rf "$out"
mkdir -p "$out"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "1/7 demo data: moving handwritten digits (scikit-learn) encoded with libx264, plus stills"
$py -m data_prep.make_demo_data --output_dir "$out/data"
$py -m data_prep.make_demo_data --output_dir "$out/eval_data" --num_clips 150 --num_images 0 --seed 1

step "2/7 codec patchification (Apache Beam, DirectRunner on both cores)"
for split in data eval_data; do
  $py -m data_prep.codec_patchify --input "$out/$split/list.txt" --output_dir "$out/records/$split" \
    --image_size 112 --class_labels "$out/$split/class_labels.json" \
    --direct_num_workers=2 --direct_running_mode=multi_processing
done
$py -m data_prep.visualize --input "$out/records/data" --index 0 --output "$out/selected_patches.png"

step "3/7 bootstrap teacher embeddings (no download) and spherical k-means concepts"
$py -m data_prep.glyph_teacher --records "$out/records/data" --output "$out/teacher"
$py -m data_prep.cluster --embeddings "$out/teacher" --num_clusters 32 --top_k 3 --output "$out/concepts"

step "4/7 train the tiny encoder (cluster discrimination, $steps steps); kNN on held-out digits at start and end"
$py -m ovenc_jax.main --config "configs/pretrain.py:variant=tiny,data=$out/records/data,eval_data=$out/records/eval_data" \
  --workdir "$out/train" --config.input.label_table="$out/concepts/labels.npz" \
  --config.loss.num_classes=32 --config.total_steps="$steps" --config.log_every=25 ${DEMO_TRAIN_FLAGS:-} \
  | tee "$out/train.log"

step "5/7 export to PyTorch and check it loads"
$py -m ovenc_jax.export_torch --workdir "$out/train" --output "$out/torch"

step "6/7 plots"
$py -m ovenc_jax.plot_metrics --workdir "$out/train" --output "$out/loss_curve.png"

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
print(f"final loss {s['final_loss']:.4f} after {s['final_step']} steps")
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
