#!/bin/bash
# B2's runs one after another (never two torch jobs at once); each resumes where it stopped.
cd "$(dirname "$0")/../.."
PY=${PY:-python}
for spec in "resnet18_tv 0" "vgg16_bn 0" "resnet18_tv 1" "resnet18_tv 2"; do
  set -- $spec
  $PY benchmarks/b2_paper_protocol.py --arch "$1" --seed "$2" || exit 1
done
