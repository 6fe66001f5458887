#!/usr/bin/env bash
# Rewrites constraints.txt from the current environment (after `pip install -e ".[test]"`
# and a green test suite): the pinned set the README's install commands use.
set -euo pipefail
cd "$(dirname "$0")/.."
pip check
{
  sed -n '1,/^# torch:/p' constraints.txt
  pip freeze | grep -v -e '^-e' -e 'fedjax' -e '^#' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
