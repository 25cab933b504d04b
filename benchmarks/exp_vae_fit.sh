#!/bin/bash
# Usage: benchmarks/exp_vae_fit.sh  (needs a finished demo lake at /tmp/demo-lake; writes /tmp/vae-lake)
# VAE lever (issue 18): the demo VAE fitted 10x longer; its vae-recon ceiling vs the demo VAE's, same lake.
set -e
cd /work/main
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
L=/tmp/vae-lake
rm -rf $L; cp -a /tmp/demo-lake $L
t0=$(date +%s)
.venv/bin/cpldm --lake $L fit-vae --preset demo --vae-id vae3000 --set steps=3000; echo "fit-vae $(( $(date +%s)-t0 )) s"
.venv/bin/cpldm --lake $L ingest --preset demo --vae vae3000 --vae-id vae3000; echo "ingest $(( $(date +%s)-t0 )) s"
.venv/bin/cpldm --lake $L vae-recon --vae-id vae3000 --run vae3000; echo "vae-recon $(( $(date +%s)-t0 )) s"
.venv/bin/cpldm --lake $L profile --preset demo --dataset vae3000; echo "profile $(( $(date +%s)-t0 )) s"
.venv/bin/cpldm --lake $L evaluate --preset demo --run vaeexp --data-types real,vae-recon,vae-recon-vae3000; echo "evaluate $(( $(date +%s)-t0 )) s"
