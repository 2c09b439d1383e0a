#!/usr/bin/env bash
# aifactory set-up in one place. From a fresh clone:
#   infra/dev.sh run    install everything, run the whole pipeline on profile "local"
#   infra/dev.sh test   install everything, bring up the local site, run the whole test suite
#   infra/dev.sh setup  only install (Python venv in .venv; Debian packages for the site)
#   infra/dev.sh lint   ruff and mypy, as `test` runs them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${AIF_VENV:-.venv}

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  echo "== installing Python packages into $VENV (first time: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch pinned exactly: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[dev]"
}

setup_site_packages() {
  # Debian packages of the local site; `aif site up` installs them too if missing.
  local need=()
  command -v slurmctld >/dev/null || need+=(slurm-wlm)
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  command -v munged >/dev/null || need+=(munge)
  command -v mariadbd >/dev/null || need+=(mariadb-server)
  # Prefect's and MLflow's database on the site (its binaries are not on PATH).
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${need[@]}" >/dev/null
  fi
  # The site's object store: Ceph's RADOS Gateway with a one-node Ceph cluster.
  local ceph=()
  command -v ceph-mon >/dev/null || ceph+=(ceph-mon)
  command -v ceph-osd >/dev/null || ceph+=(ceph-osd)
  command -v radosgw >/dev/null || ceph+=(radosgw)
  command -v ceph >/dev/null || ceph+=(ceph-common)
  if [ ${#ceph[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${ceph[*]}"
    export DEBIAN_FRONTEND=noninteractive
    [ ${#need[@]} -gt 0 ] || apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${ceph[@]}" >/dev/null
  fi
}

typecheck() {
  # The folders are installed as one package, aifactory.{tasks,flows,infra,deployments}
  # (pyproject.toml's package-dir). mypy cannot follow that mapping, so it reads the same
  # files through a tree of links that has the installed shape.
  local tree=.aif/typecheck
  rm -rf "$tree" && mkdir -p "$tree/aifactory"
  for d in tasks flows infra deployments; do ln -s "$PWD/$d" "$tree/aifactory/$d"; done
  MYPYPATH="$tree" "$VENV/bin/mypy" --ignore-missing-imports \
    -p aifactory.tasks -p aifactory.flows -p aifactory.infra -p aifactory.deployments
}

cmd="${1:-run}"
shift || true
case "$cmd" in
  setup)
    setup_python
    setup_site_packages
    ;;
  lint)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    typecheck
    ;;
  run)
    setup_python
    exec "$VENV/bin/aif" run "$@"
    ;;
  test)
    setup_python
    setup_site_packages
    # The suite's state (its site, lake, registry) lives in the clone, not in ~/.aif.
    export AIF_HOME="${AIF_HOME:-$PWD/.aif}"
    "$VENV/bin/ruff" check .
    typecheck
    # Set before `site up`: a part that fails to start must not leave the others running.
    trap '"$VENV/bin/aif" site down || true' EXIT
    "$VENV/bin/aif" site up
    if [ "$#" -gt 0 ]; then  # the tests named: one pytest, as given
      "$VENV/bin/python" -m pytest --site -q --durations=15 "$@"
      exit
    fi
    # The whole suite: the tests that need no site (unit, local, the README's own command)
    # run beside the site tests, at a lower CPU priority: the site tests wait on Slurm and
    # the services most of the time. Their output comes after the site tests'.
    others_log="$AIF_HOME/test-others.log"
    mkdir -p "$AIF_HOME"
    nice -n 10 "$VENV/bin/python" -m pytest -q --durations=10 -m "not site" \
      -p no:cacheprovider >"$others_log" 2>&1 &
    others=$!
    trap 'kill "$others" 2>/dev/null || true; "$VENV/bin/aif" site down || true' EXIT
    site_rc=0
    "$VENV/bin/python" -m pytest --site -q --durations=15 -m site || site_rc=$?
    others_rc=0
    wait "$others" || others_rc=$?
    echo "== the tests that need no site (beside the site tests): $others_log"
    cat "$others_log"
    echo "== site tests: exit $site_rc; the others: exit $others_rc"
    [ "$site_rc" -eq 0 ] && [ "$others_rc" -eq 0 ]
    ;;
  *)
    echo "usage: infra/dev.sh run|test|setup|lint [args]" >&2
    exit 2
    ;;
esac
