#!/usr/bin/env bash
# Bisect of the native gshard loss under CUDA-graph capture (native/NOTES.md, tenth session):
# this tree with the capture exclusion in ops._ops.gshard_loss_native removed, each variant with
# one more change, each running tests/gpu/test_layer_gpu.py (where the make_graphed training
# capture failed after the file's earlier tests). Prints pass/fail per variant; the files are
# put back after each.
#   bash scripts/bisect_capture_gshard.sh        (on the GPU machine, from the repo root)
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ext_new}
BACKUP=$(mktemp -d)

variant() {   # name, then sed edits as "file|expression"; applied in place (the same source paths:
  local name=$1; shift   # no rebuild of the extension), put back after the run
  local files="adaptmoe/ops/_ops.py"
  for edit in "$@"; do files="$files ${edit%%|*}"; done
  for f in $files; do mkdir -p "$BACKUP/$(dirname "$f")"; cp "$f" "$BACKUP/$f"; done
  sed -i 's/eager_autograd(scores_TE) or torch.cuda.is_current_stream_capturing() or scores_TE/eager_autograd(scores_TE) or scores_TE/' \
      adaptmoe/ops/_ops.py
  for edit in "$@"; do sed -i "${edit#*|}" "${edit%%|*}"; done
  local out
  out=$(PYTHONPATH=. timeout 300 python3 -m pytest -m gpu tests/gpu/test_layer_gpu.py -q -W ignore -p no:cacheprovider 2>&1)
  for f in $files; do cp "$BACKUP/$f" "$f"; done
  echo "== $name: $(echo "$out" | tail -1)"
  echo "$out" | grep -m3 -i "error\|invalidated" | cut -c1-300
}

GC_OFF='tests/gpu/test_layer_gpu.py|s/^    graphed = torch.cuda.make_graphed_callables(module, (x,))/    import gc; gc.collect(); gc.disable(); graphed = torch.cuda.make_graphed_callables(module, (x,)); gc.enable()/'
NOGRAD_LOSS_OFF='adaptmoe/native_forward.py|s/gshard_loss=tuple(kind for kind in gate_cfg.losses if kind != "none") == ("gshard",),/gshard_loss=False,/'
variant no_exclusion
variant no_exclusion_gc_off_in_capture "$GC_OFF"
variant no_exclusion_nograd_loss_in_python "$NOGRAD_LOSS_OFF"
rm -rf "$BACKUP"
