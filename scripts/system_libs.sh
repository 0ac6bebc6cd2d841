#!/usr/bin/env bash
# The system libraries that pinned wheels link against but do not ship; `make setup` runs this first.
# open3d (imported by nersemble-benchmark, the official NeRSemble toolkit the tests use as their oracle) links
# libusb-1.0, which a fresh Debian/Ubuntu machine does not have. As root it installs what is missing with
# apt-get; otherwise it names the packages and the command, and fails.
set -euo pipefail

# shared object      Debian/Ubuntu package
NEEDED="
libusb-1.0.so.0      libusb-1.0-0
"

ldconfig_bin=$(command -v ldconfig || echo /sbin/ldconfig)
missing=()
while read -r soname package; do
  [ -n "$soname" ] || continue
  "$ldconfig_bin" -p | grep -q "$soname" || missing+=("$package")
done <<< "$NEEDED"
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
  echo "make setup: installing system libraries: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
else
  echo "make setup: missing system libraries ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
