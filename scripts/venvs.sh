#!/usr/bin/env bash
# The extra interpreters the test suite runs code in, each a venv in the checkout (git-ignored). A venv
# is built once and rebuilt only when its recipe changes: its .stamp file holds the hash of the
# interpreter's version, pyproject.toml and the install function below; a venv without a matching
# stamp (a build cut short included) is removed and built again.
#
#   .venv-py38    Python 3.8 (IsaacGym's), the base install only (-e ., no extras) + numpy:
#                 the trainer side on the Python TokenHSI runs on.
#   .venv-base    Python 3.11, the base install only (-e ., no extras): the `relay` command on a
#                 trainer-only install.
#   .venv-rlg114  Python 3.11, TokenHSI's pinned rl-games 1.1.4 with what it imports, and this package
#                 without extras (the `train` extra pins rl-games 1.6.5).
#
# The package is installed editable (-e .): the venvs run this checkout's code, so a code change needs
# no rebuild. Python 3.8 is `python3.8`, or pyenv's 3.8 when the pyenv shim has none selected, or
# $RELAY_PYTHON38. Without one, the build fails where CI is set and is left out (with a warning) elsewhere.
# Usage: scripts/venvs.sh [NAME...]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."

install_py38() {
  pip install -q -e . "numpy<2"
}

install_base() {
  pip install -q -e .
}

install_rlg114() {
  # rl-games 1.1.4 asks for an unpinned torch and ray: its own requirements are left out and what its
  # modules import is pinned here (torch unpinned would pull a multi-GB CUDA build; ray is imported by
  # rl_games.common.vecenv, tensorboard by sac_agent through torch.utils.tensorboard, both at module
  # level; its psutil and setproctitle are imported nowhere).
  pip install -q torch==2.13.0 "numpy<1.24" gym==0.26.2 ray==2.58.0 tensorboard==2.21.0 tensorboardX==2.6.5 pyyaml
  pip install -q --no-deps rl-games==1.1.4
  pip install -q -e .
}

find_python38() {
  local candidate
  if [ -n "${RELAY_PYTHON38:-}" ]; then
    if ! "$RELAY_PYTHON38" -c 'import sys; assert sys.version_info[:2] == (3, 8)' 2>/dev/null; then
      echo "venvs: RELAY_PYTHON38=$RELAY_PYTHON38 is not a Python 3.8 interpreter (unset it, or name one)" >&2
      return 1
    fi
    echo "$RELAY_PYTHON38"
    return
  fi
  local pyenv_root
  pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for candidate in "$(command -v python3.8 || true)" "$pyenv_root"/versions/3.8*/bin/python3.8; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] \
        && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 8)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
}

build() {  # build DIR PYTHON INSTALL_FUNCTION
  local dir=$1 python=$2 install=$3 version stamp started
  version=$("$python" -c 'import sys; print(sys.version)')
  stamp=$({ echo "$version"; cat pyproject.toml; declare -f "$install"; } | sha256sum | cut -c1-64)
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ] && [ -x "$dir/bin/python" ]; then
    echo "venvs: $dir is up to date"
    return
  fi
  started=$SECONDS
  rm -rf "$dir"
  "$python" -m venv "$dir"
  (PATH="$PWD/$dir/bin:$PATH" VIRTUAL_ENV="$PWD/$dir" PIP_DISABLE_PIP_VERSION_CHECK=1 "$install")
  echo "$stamp" > "$dir/.stamp"
  echo "venvs: built $dir in $((SECONDS - started)) s"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(py38 base rlg114)
for name in "${names[@]}"; do
  case "$name" in
    py38)
      python38=$(find_python38) || exit 1
      if [ -z "$python38" ]; then
        if [ -n "${CI:-}" ]; then
          echo "venvs: no Python 3.8 found (python3.8, pyenv's 3.8, or RELAY_PYTHON38):" \
            "CI must test the trainer side on it" >&2
          exit 1
        fi
        echo "venvs: no Python 3.8 found (python3.8, pyenv's 3.8, or RELAY_PYTHON38);" \
          "the Python 3.8 tests will be skipped" >&2
        continue
      fi
      build .venv-py38 "$python38" install_py38 ;;
    base) build .venv-base python3 install_base ;;
    rlg114) build .venv-rlg114 python3 install_rlg114 ;;
    *) echo "venvs: unknown venv $name (known: py38 base rlg114)" >&2; exit 2 ;;
  esac
done
