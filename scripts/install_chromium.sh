#!/usr/bin/env bash
# Headless Chromium for the chat-page browser tests (tests/test_web_browser.py): Debian's chromium and
# chromium-driver, through apt-get. Never fails the build: where they cannot be installed (no apt-get, not root and
# no password-less sudo, apt-get failing) it says why, and the browser tests skip with that reason.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
why="the browser tests will skip; install Debian's chromium and chromium-driver to run them"
if ! command -v apt-get >/dev/null; then
  echo "no apt-get on this machine: $why"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "not root and no password-less sudo: $why (sudo apt-get install chromium chromium-driver)"
    exit 0
  fi
fi
echo "installing chromium and chromium-driver (apt-get) for the browser tests"
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null; }; then
  echo "apt-get could not install chromium and chromium-driver: $why"
fi
exit 0
