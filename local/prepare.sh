#!/usr/bin/env bash
# Data preparation (icefall style): corpus -> lhotse manifests -> features -> validated cut manifests.
#
#   local/prepare.sh --dl-dir download --nj 8                      # LibriSpeech in download/LibriSpeech
#   local/prepare.sh --corpus aishell --dl-dir download            # AISHELL-1 in download/aishell/data_aishell
#   local/prepare.sh --corpus kaldi --name mycorpus --dl-dir /path/to/kaldi/data   # dirs with wav.scp+text
#   local/prepare.sh --feature-type whisper --num-mel-bins 128     # Whisper large-v3 log-mel features
#   local/prepare.sh --feature-type firered --firered-cmvn models/FireRedASR-AED-L/cmvn.ark  # FireRedASR
#   local/prepare.sh --stage 3 --stop-stage 3                      # one stage only
#
# Stages (each skipped when its .done marker exists; delete the marker to redo it):
#   0  check the corpus directory
#   1  manifests:  <data-dir>/manifests/<name>_{recordings,supervisions}_<part>.jsonl.gz
#                  (+ <name>_skipped_<part>.tsv: every unusable utterance with file and reason)
#   2  MUSAN (only when <dl-dir>/musan exists): <fbank-dir>/musan_cuts.jsonl.gz (firered: audio only)
#   3  features:   <fbank-dir>/<name>_cuts_<part>.jsonl.gz (+ <name>_cuts_train-all-shuf.jsonl.gz
#                  for LibriSpeech: every train part present, shuffled)
#   4  validate:   features present and readable, num_frames consistent with durations, texts non-empty
#   5  Shar (only with --shar-shard-size N): <data-dir>/shar/<name>_<part>/{cuts,features}.NNNNNN.* shards of
#      the training part (train-all-shuf for LibriSpeech, else train) for --train-cuts <that dir>
#
# Outputs go to <data-dir> (default ./data), relative to the current directory. Logs are written
# to stdout and to <data-dir>/log/prepare-<time>.log.
set -euo pipefail

stage=0
stop_stage=100
nj=4
dl_dir=$PWD/download
corpus=librispeech       # librispeech | aishell | kaldi
corpus_dir=              # default: <dl-dir>/LibriSpeech, <dl-dir>/aishell, <dl-dir> (alias: --kaldi-dir)
name=                    # manifest prefix; default: librispeech, aishell (required for kaldi; alias: --corpus-name)
part=                    # kaldi: part name when the corpus dir is a single data dir (default: its basename)
language=                # kaldi: language stored in the supervisions
data_dir=data
feature_type=fbank       # fbank (80-dim Kaldi fbank, 25/10 ms) | whisper (Whisper log-mel) | firered (FireRedASR)
num_mel_bins=80          # 80; 128 for Whisper large-v3
firered_cmvn=            # firered: the model's cmvn.ark (required), copied to <fbank-dir>/firered_cmvn.ark
fbank_dir=               # default: <data-dir>/fbank (fbank), <data-dir>/fbank_whisper<bins> (whisper),
                         #          <data-dir>/fbank_firered (firered)
resample=false           # true: keep non-16 kHz audio (resampled on load); false: skip it (logged)
validate_read_features=1 # 0: validation checks metadata only (fast on large corpora)
shar_shard_size=         # stage 5 (off when empty): cuts per Shar shard, e.g. 1000
shar_features=lilcom     # stage 5: lilcom (lossy, small) | numpy (float32 as stored)

# --- option parsing (own implementation of icefall's parse_options.sh) -------------------------
options=(stage stop_stage nj dl_dir corpus corpus_dir name part language data_dir feature_type
         num_mel_bins firered_cmvn fbank_dir resample validate_read_features shar_shard_size shar_features)
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Options (default):"
  for o in "${options[@]}"; do echo "  --${o//_/-} (${!o})"; done
}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --*=*) opt=${1%%=*}; val=${1#*=}; shift ;;
    --*) opt=$1; [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }; val=$2; shift 2 ;;
    *) echo "$0: unexpected argument '$1' (see --help)" >&2; exit 1 ;;
  esac
  var=${opt#--}; var=${var//-/_}
  case "$var" in  # aliases
    kaldi_dir) var=corpus_dir ;;
    corpus_name) var=name ;;
  esac
  known=false
  for o in "${options[@]}"; do [ "$o" = "$var" ] && known=true; done
  $known || { echo "$0: unknown option $opt (see --help)" >&2; exit 1; }
  printf -v "$var" '%s' "$val"
done

local_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
mkdir -p "$data_dir/log"
log_file=$data_dir/log/prepare-$(date '+%Y%m%d-%H%M%S').log
exec > >(tee -a "$log_file") 2>&1

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}
die() { log "ERROR: $*"; exit 1; }

case "$corpus" in
  librispeech) : "${name:=librispeech}"; : "${corpus_dir:=$dl_dir/LibriSpeech}"
               train_parts="train-clean-100 train-clean-360 train-other-500 train-clean-5" ;;
  aishell)     : "${name:=aishell}"; : "${corpus_dir:=$dl_dir/aishell}"; train_parts= ;;
  kaldi)       [ -n "$name" ] || die "--corpus kaldi needs --name (the manifest prefix, e.g. mycorpus)"
               : "${corpus_dir:=$dl_dir}"; train_parts= ;;
  *) die "unknown --corpus '$corpus' (librispeech | aishell | kaldi)" ;;
esac
case "$feature_type" in
  fbank) : "${fbank_dir:=$data_dir/fbank}" ;;
  whisper) : "${fbank_dir:=$data_dir/fbank_whisper$num_mel_bins}" ;;
  firered) : "${fbank_dir:=$data_dir/fbank_firered}" ;;
  *) die "unknown --feature-type '$feature_type' (fbank | whisper | firered)" ;;
esac
feature_opts=(--feature-type "$feature_type" --num-mel-bins "$num_mel_bins")
if [ "$feature_type" = firered ] && [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  # FireRedASR features are CMVN-normalised with the model's statistics: the feature dir belongs to
  # one cmvn.ark (kept as <fbank-dir>/firered_cmvn.ark), a different one needs another --fbank-dir.
  [ -n "$firered_cmvn" ] || die "--feature-type firered needs --firered-cmvn (the model's cmvn.ark,
  e.g. models/FireRedASR-AED-L/cmvn.ark)"
  [ -f "$firered_cmvn" ] && [ -r "$firered_cmvn" ] || die "--firered-cmvn $firered_cmvn: cmvn.ark not found or not readable"
  if [ -e "$fbank_dir/firered_cmvn.ark" ] && ! cmp -s "$firered_cmvn" "$fbank_dir/firered_cmvn.ark"; then
    die "$fbank_dir holds features normalised with another cmvn.ark ($fbank_dir/firered_cmvn.ark differs from
  $firered_cmvn): use another --fbank-dir or delete $fbank_dir"
  fi
fi
if [ -n "$firered_cmvn" ]; then feature_opts+=(--firered-cmvn "$firered_cmvn"); fi
manifest_dir=$data_dir/manifests
# The stages' Python helpers import the llmasr package: say so now, not after stage 0.
"$python" -c "import llmasr" 2>/dev/null || die "$python cannot import llmasr: run bash local/setup.sh (pip install -e .),
  or set PYTHON to the interpreter of the environment where llmasr is installed"

log "Running $0 (log: $log_file)"
log "corpus=$corpus name=$name corpus_dir=$corpus_dir feature_type=$feature_type num_mel_bins=$num_mel_bins${firered_cmvn:+ firered_cmvn=$firered_cmvn}"
log "manifest_dir=$manifest_dir fbank_dir=$fbank_dir nj=$nj stages $stage..$stop_stage"

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: check the corpus directory"
  # No download here (clusters rarely have internet on compute nodes): fetch the corpus yourself,
  # e.g. `lhotse download librispeech --full $dl_dir`, or symlink it into $dl_dir.
  [ -d "$corpus_dir" ] || die "corpus directory $corpus_dir does not exist (wrong --dl-dir '$dl_dir'?
  expected: librispeech -> <dl-dir>/LibriSpeech/<part>/..., aishell -> <dl-dir>/aishell/data_aishell/...,
  kaldi -> <dl-dir> is a data dir with wav.scp and text, or holds one such dir per part)"
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: prepare $name manifests"
  mkdir -p "$manifest_dir"
  if [ ! -e "$manifest_dir/.$name.done" ]; then
    extra=()
    [ -n "$part" ] && extra+=(--part "$part")
    [ -n "$language" ] && extra+=(--language "$language")
    "$python" "$local_dir/prepare_manifests.py" --corpus "$corpus" --corpus-dir "$corpus_dir" \
      --output-dir "$manifest_dir" --prefix "$name" --nj "$nj" --resample "$resample" "${extra[@]}"
    touch "$manifest_dir/.$name.done"
  else
    log "$manifest_dir/.$name.done exists - skipping"
  fi
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  if [ -d "$dl_dir/musan" ]; then
    log "Stage 2: MUSAN manifests and features"
    if [ ! -e "$fbank_dir/.musan.done" ]; then
      "$python" "$local_dir/compute_fbank_musan.py" --musan-dir "$dl_dir/musan" --manifest-dir "$manifest_dir" \
        --fbank-dir "$fbank_dir" "${feature_opts[@]}" --nj "$nj"
      touch "$fbank_dir/.musan.done"
    else
      log "$fbank_dir/.musan.done exists - skipping"
    fi
  else
    log "Stage 2: $dl_dir/musan not found - skipping MUSAN (only needed for --enable-musan)"
  fi
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: compute $feature_type features for $name"
  mkdir -p "$fbank_dir"
  if [ ! -e "$fbank_dir/.$name.done" ]; then
    combine=()
    [ -n "$train_parts" ] && combine=(--combine-train $train_parts)
    if [ "$feature_type" = firered ] && [ ! -e "$fbank_dir/firered_cmvn.ark" ]; then
      cp "$firered_cmvn" "$fbank_dir/firered_cmvn.ark.tmp" && mv "$fbank_dir/firered_cmvn.ark.tmp" "$fbank_dir/firered_cmvn.ark"
    fi
    "$python" "$local_dir/compute_fbank.py" --manifest-dir "$manifest_dir" --fbank-dir "$fbank_dir" \
      --prefix "$name" "${feature_opts[@]}" --nj "$nj" "${combine[@]}"
    touch "$fbank_dir/.$name.done"
  else
    log "$fbank_dir/.$name.done exists - skipping"
  fi
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: validate $fbank_dir/${name}_cuts_*"
  if [ ! -e "$fbank_dir/.$name-validated.done" ]; then
    shopt -s nullglob
    files=("$fbank_dir/${name}"_cuts_*.jsonl.gz)
    [ ${#files[@]} -gt 0 ] || die "no $fbank_dir/${name}_cuts_*.jsonl.gz: run stage 3 first"
    "$python" "$local_dir/validate_manifests.py" --nj "$nj" --read-features "$validate_read_features" "${files[@]}"
    touch "$fbank_dir/.$name-validated.done"
  else
    log "$fbank_dir/.$name-validated.done exists - skipping"
  fi
fi

if [ -n "$shar_shard_size" ] && [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
  shar_part=train; [ "$corpus" = librispeech ] && shar_part=train-all-shuf
  shar_out="$data_dir/shar/${name}_$shar_part"
  log "Stage 5: Shar shards of $fbank_dir/${name}_cuts_$shar_part.jsonl.gz -> $shar_out"
  if [ ! -e "$data_dir/shar/.${name}_$shar_part.done" ]; then
    "$python" "$local_dir/export_shar.py" "$fbank_dir/${name}_cuts_$shar_part.jsonl.gz" "$shar_out" \
      --shard-size "$shar_shard_size" --features "$shar_features" --num-jobs "$nj"
    touch "$data_dir/shar/.${name}_$shar_part.done"  # (outside the shard dir: lhotse reads every file in it)
  else
    log "$data_dir/shar/.${name}_$shar_part.done exists - skipping"
  fi
fi

log "Done"
