#!/usr/bin/env bash
# The Kubernetes manifests and the observability config, checked offline
# (`make k8s-check`, run by .ci/run):
#
#   1. every kustomization under k8s/ (the base, cert-manager, each overlay)
#      renders with `kubectl kustomize`;
#   2. the rendered output validates with `kubernetes-validate --strict`
#      against each Kubernetes version in K8S_VERSIONS (the oldest we support
#      and the newest the validator ships); a kind it has no schema for fails,
#      except the CRDs named in CRD_GROUPS (cert-manager's);
#   3. checkov (framework kubernetes) passes on every rendered output, skipping
#      only the checks listed with a reason in k8s/checkov-skips.yaml;
#   4. k8s/observability/rules.yaml is what triplane_tools.slo_rules makes of
#      slos.yaml, and `promtool check rules` / `promtool test rules` pass
#      (promtool is Debian's `prometheus` package; missing, it fails under
#      CI=true and is skipped loudly elsewhere);
#   5. the dashboards under k8s/observability/dashboards/ are what
#      triplane_tools.dashboards makes, and JSON.
#
# Environment: K8S_VENV (the validators' venv, default .venv-k8s), PY (the
# project's Python, default .venv/bin/python), KUBECTL (default kubectl).
set -uo pipefail
cd "$(dirname "$0")/.."

K8S_VENV=${K8S_VENV:-.venv-k8s}
PY=${PY:-.venv/bin/python}
KUBECTL=${KUBECTL:-kubectl}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
# API groups of custom resources the manifests use, which no built-in schema
# describes: kubernetes-validate warns on them and they pass.
CRD_GROUPS="cert-manager.io"
SKIPS_FILE=k8s/checkov-skips.yaml
OBS=k8s/observability

in_ci() { case "${CI:-}" in true | 1 | yes | TRUE | True) return 0 ;; *) return 1 ;; esac; }

failed=()
fail() { echo "k8s-check: FAILED: $*" >&2; failed+=("$1"); }

out=$(mktemp -d)
trap 'rm -rf "${out}"' EXIT

# 1. Render.
rendered=()
while IFS= read -r kustomization; do
  dir=$(dirname "${kustomization}")
  name=${dir#k8s/}
  name=${name//\//-}
  file="${out}/${name}.yaml"
  if "${KUBECTL}" kustomize "${dir}" >"${file}"; then
    echo "k8s-check: rendered ${dir} ($(grep -c '^kind:' "${file}") objects)"
    rendered+=("${file}")
  else
    fail "render ${dir}"
  fi
done < <(find k8s -name kustomization.yaml -not -path '*/.*' | sort)
if [ ${#rendered[@]} -eq 0 ]; then
  fail "render: no kustomization under k8s/"
fi

# 2. Schemas.
crd_re=$(echo "${CRD_GROUPS}" | sed 's/\./\\./g; s/ /|/g')
for version in ${K8S_VERSIONS}; do
  log="${out}/validate-${version}.log"
  if ! "${K8S_VENV}/bin/kubernetes-validate" --strict -k "${version}" --quiet \
    "${rendered[@]}" >"${log}" 2>&1; then
    cat "${log}" >&2
    fail "kubernetes-validate --strict -k ${version}"
    continue
  fi
  unknown=$(grep -E "Couldn't find schema" "${log}" | grep -Ev "api version (${crd_re})/" || true)
  if [ -n "${unknown}" ]; then
    echo "${unknown}" >&2
    fail "kubernetes-validate -k ${version}: kinds without a schema"
    continue
  fi
  echo "k8s-check: kubernetes-validate --strict -k ${version}: valid (CRDs of ${CRD_GROUPS} not checked)"
done

# 3. Checkov, with the reasoned skips.
skips=$("${K8S_VENV}/bin/python" - "${SKIPS_FILE}" <<'PY'
import re
import sys

import yaml

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    skips = yaml.safe_load(f) or {}
bad = [k for k, v in skips.items() if not re.fullmatch(r"CKV2?_K8S_[0-9]+", str(k))]
bad += [k for k, v in skips.items() if not isinstance(v, str) or len(v.split()) < 5]
if bad:
    sys.exit(f"{path}: every skipped check needs a check id and a reason: {bad}")
print(",".join(sorted(skips)))
PY
) || fail "checkov skips (${SKIPS_FILE})"
if [ ${#rendered[@]} -gt 0 ]; then
  if "${K8S_VENV}/bin/checkov" --directory "${out}" --framework kubernetes --quiet --compact \
    --skip-download ${skips:+--skip-check "${skips}"} >"${out}/checkov.log" 2>&1; then
    echo "k8s-check: checkov: every check passed (skipped, with reasons: ${skips:-none})"
  else
    grep -vE 'prismacloud|urllib3|NameResolution|guidelines' "${out}/checkov.log" >&2
    fail "checkov"
  fi
fi

# 4. SLO rules.
if "${PY}" -m triplane_tools.slo_rules --check; then :; else fail "slo rules up to date"; fi
if command -v promtool >/dev/null 2>&1; then
  promtool check rules "${OBS}/rules.yaml" || fail "promtool check rules"
  (cd "${OBS}" && promtool test rules rules_test.yaml) || fail "promtool test rules"
elif in_ci; then
  fail "promtool: not installed (Debian's prometheus package), and CI=true"
else
  echo "" >&2
  echo "*** k8s-check: SKIPPING promtool check/test rules: promtool is not installed" >&2
  echo "*** (apt-get install prometheus; under CI=true this fails) ***" >&2
  echo "" >&2
fi

# 5. Dashboards: what triplane_tools.dashboards makes, and JSON (tests/k8s
#    checks every query against the metrics the planes export).
"${PY}" -m triplane_tools.dashboards --check || fail "dashboards up to date"
for dashboard in "${OBS}"/dashboards/*.json; do
  "${PY}" -m json.tool "${dashboard}" >/dev/null || fail "dashboard ${dashboard} is not JSON"
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "k8s-check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "k8s-check: ok"
