#!/usr/bin/env bash
# clframe's training speed at each prompt strategy's reference batch size, then the peers' own L2P
# step in the same machine session, so every ratio comes from one run (JSON lines on stdout).
#
#   bash bench/side_by_side.sh [PEERS_DIR]
#
# PEERS_DIR holds the peers' harness (peers_l2p.py, wheels/, wheels_mammoth/: l2p-pytorch and
# mammoth's L2P); it is not part of this repository, and without it only clframe is measured.
# PROTOCOL=1 also times the whole Split CIFAR-100 L2P protocol at the default config (needs mlflow).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PEERS=${1:-}
BATCHES=16,24,128
python3 bench/throughput.py --strategies l2p dualprompt coda_prompt --graph-ab --eval-batch 128
python3 bench/throughput.py --strategies l2p --batch 128 --graph-ab --eval-batch 128
if [ "${PROTOCOL:-0}" = 1 ]; then
    python3 bench/throughput.py --strategies l2p --protocol --skip-throughput
fi
if [ -n "$PEERS" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/peer_site "$PEERS"/wheels/*.whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/peer_site_mammoth "$PEERS"/wheels_mammoth/*.whl
    PYTHONPATH=/tmp/peer_site_mammoth python3 "$PEERS/peers_l2p.py" --impl mammoth --mammoth_O 1 --batches $BATCHES \
        2>&1 | grep -E '^\{|Error'
    PYTHONPATH=/tmp/peer_site python3 "$PEERS/peers_l2p.py" --impl l2p_pytorch --batches $BATCHES 2>&1 | grep -E '^\{|Error'
fi
