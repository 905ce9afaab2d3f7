#!/usr/bin/env bash
# Debian packages the tests drive as real programs: chromium + its driver (the status page in a headless
# browser) and docker-compose (validates the compose files; there is no Docker engine on test machines).
# Installs only what is missing, so a prepared machine pays nothing.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if ((${#missing[@]} == 0)); then echo "test tools: present"; exit 0; fi
echo "test tools: installing Debian's ${missing[*]}"
sudo_cmd=""
[[ "$(id -u)" != 0 ]] && sudo_cmd="sudo"
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
