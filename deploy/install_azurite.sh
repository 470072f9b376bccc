#!/usr/bin/env bash
# Azurite (Azure Storage's emulator, from npm) for the Azure Blob tests, into <repo>/.tools/azurite.
# Installs only when its binary is missing, so `make test` pays for it once per clone.
#
#   deploy/install_azurite.sh            # -> .tools/azurite/node_modules/.bin/azurite-blob
#
# Without node/npm it says so and exits 0: the Azure tests then skip, naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=.tools/azurite
version=3.37
if [ -x "$prefix/node_modules/.bin/azurite-blob" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: Azurite not installed; the Azure Blob tests will be skipped" >&2
  exit 0
fi
mkdir -p "$prefix"
echo "installing azurite@$version into $prefix ..."
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$version" >/dev/null
