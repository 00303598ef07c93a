#!/usr/bin/env bash
# Fetch the training corpus (same as `flopwise data fetch`): the King James Bible
# (Debian bible-kjv-text, decoded by bible-kjv's `bible`) and the Jargon File 4.4.7
# (Debian jargon-text), ~5.6 MB of English, split into train/val and cached in
# $FLOPWISE_DATA/corpus (default ~/.cache/flopwise/corpus). Needs apt-get and dpkg-deb;
# `apt-get download` installs nothing and needs no root (run `apt-get update` once if the
# package lists are empty). Prints the checksum of the split text.
#
#   bash scripts/fetch_corpus.sh            # fetch once (a no-op when present)
#   bash scripts/fetch_corpus.sh --force    # fetch again
set -euo pipefail
force=False
if [[ "${1:-}" == "--force" ]]; then force=True; fi
python3 - <<PY
from flopwise.models.data import fetch_corpus
m = fetch_corpus(force=${force})
print(f"{m['name']}: train {m['train_bytes']:,} B, val {m['val_bytes']:,} B, sha256 {m['sha256']}")
PY
