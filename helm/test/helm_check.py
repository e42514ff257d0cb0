#!/usr/bin/env python3
"""Offline checks of the blockmirror Helm chart (no helm binary, no cluster).

Runs in a venv with the packages pinned in requirements.txt next to this
file; tests/tests/helm_chart.rs runs it under `cargo test`.

  helm_check.py check
      helm lint --strict (Kubernetes v1.31.0) with the default values and
      with values-full.yaml (every optional feature on); yamllint on the
      values files and on the rendered manifests; renders both value sets
      and validates every manifest against the Kubernetes 1.31 schemas in
      strict mode (kubernetes-validate's check; only the ServiceMonitor, a
      CRD without a bundled schema, is skipped, by name); and every file in
      bad-values/ must be refused by lint and by render with the message
      its `# expect:` line names.  Prints one JSON report on stdout: the
      rendered objects of both value sets (by kind), what was checked, and
      `failures`.  Exit status 1 if there is any failure.

  helm_check.py render VALUES.json
      VALUES.json holds a list of value sets; each is schema-checked,
      rendered and validated like above.  Prints a JSON list: per set, the
      rendered objects by kind (or `failures`).  Exit status 1 on a failure.

The assertions about what the manifests contain are in the Rust test, on
the JSON this prints.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import sys
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE.parent / "blockmirror"
KUBE_VERSION = "1.31.0"
RELEASE = "bm"
NAMESPACE = "storage"
# Kinds whose schema kubernetes-validate does not bundle (CRDs): not
# validated, and listed as skipped in the report.  Any other kind without a
# schema is a failure (the CLI would only warn).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checked: list[str] = []
        self.skipped: list[str] = []

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def ok(self, what: str) -> None:
        self.checked.append(what)


def check_versions(report: Report) -> None:
    """The venv must hold exactly the pinned versions."""
    for line in (HERE / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, want = line.split("==")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != want:
            report.fail(
                f"venv has {name} {have}, requirements.txt pins {want}: "
                f"recreate the venv (see .ci/run)"
            )
    report.ok("pinned package versions")


def lint(report: Report, label: str, values: dict[str, Any] | None) -> dict[str, Any]:
    """helm lint --strict; any warning or error is a failure."""
    result = helm.lint(
        str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION
    )
    for m in result["messages"]:
        if m["severity"] >= 2:
            report.fail(f"lint {label}: severity {m['severity']} {m['path']}: {m['error']}")
    for e in result.get("errors") or []:
        report.fail(f"lint {label}: {e}")
    report.ok(f"lint --strict {label}")
    return result


def yamllint(report: Report, name: str, text: str) -> None:
    conf = YamlLintConfig(file=str(HERE / "yamllint.yaml"))
    for p in linter.run(text, conf):
        report.fail(f"yamllint {name}:{p.line}:{p.column}: {p.level}: {p.desc} ({p.rule})")
    report.ok(f"yamllint {name}")


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects_of(report: Report, label: str, manifests: dict[str, str]) -> dict[str, Any]:
    """Parses the rendered manifests, validates each against the Kubernetes
    schemas, and returns them by kind (plus NOTES.txt as `NOTES`)."""
    objects: dict[str, Any] = {}
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            objects["NOTES"] = text
            continue
        if not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            docs.append(doc)
            kind = doc.get("kind", "?")
            name = doc.get("metadata", {}).get("name", "?")
            key = f"{label}: {kind}/{name}"
            if kind in objects:
                report.fail(f"{label}: two objects of kind {kind}")
            objects[kind] = doc
            if (doc.get("apiVersion"), kind) in CRD_KINDS:
                report.skipped.append(f"{key} (CRD: no bundled schema)")
                continue
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                report.ok(f"kubernetes-validate --strict -k {KUBE_VERSION} {key}")
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                report.fail(f"{key} does not validate against {KUBE_VERSION}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                report.fail(f"{key}: {e.message}")
    yamllint(report, f"rendered {label}", "".join(f"---\n{yaml.safe_dump(d, sort_keys=False)}" for d in docs))
    raw = "".join(
        f"---\n{t.strip()}\n" for p, t in sorted(manifests.items()) if p.endswith(".yaml") and t.strip()
    )
    yamllint(report, f"rendered {label} (as templated)", raw)
    return objects


def expectation(path: pathlib.Path) -> str:
    m = re.match(r"#\s*expect:\s*(.+)", path.read_text().splitlines()[0])
    if not m:
        raise SystemExit(f"{path}: the first line must be `# expect: MESSAGE`")
    return m.group(1).strip()


def bad_values(report: Report, chart: helm.Chart) -> list[dict[str, Any]]:
    """Every bad-values file must be refused with the message its `# expect:`
    line names: by values.schema.json (then lint must report it too), or by
    a `fail` in the templates when rendering.  (helm lint ignores `fail` by
    design, like `required`: it lints charts without their required values.)"""
    results = []
    for path in sorted((HERE / "bad-values").glob("*.yaml")):
        want = expectation(path)
        values = yaml.safe_load(path.read_text())
        entry: dict[str, Any] = {"file": path.name, "expect": want}
        try:
            chart.validate_schema(values)
            entry["stage"] = "template"
        except helm.HelmValuesError as e:
            entry["stage"] = "schema"
            entry["schema_error"] = str(e)
            if want not in str(e):
                report.fail(f"bad-values/{path.name}: schema error without {want!r}: {e}")
        if entry["stage"] == "schema":
            result = helm.lint(
                str(CHART), values, strict=True, namespace=NAMESPACE,
                kube_version="v" + KUBE_VERSION,
            )
            errors = [m["error"] for m in result["messages"] if m["severity"] >= 3]
            errors += result.get("errors") or []
            entry["lint_rejected"] = any(want in e for e in errors)
            if not entry["lint_rejected"]:
                report.fail(f"bad-values/{path.name}: lint did not report {want!r}: {errors}")
        try:
            render(chart, values)
            entry["render_rejected"] = False
            report.fail(f"bad-values/{path.name}: rendered without error")
        except helm.HelmError as e:
            entry["render_error"] = str(e)
            entry["render_rejected"] = want in str(e)
            if not entry["render_rejected"]:
                report.fail(f"bad-values/{path.name}: render failed without {want!r}: {e}")
        results.append(entry)
        report.ok(f"bad-values/{path.name} refused ({entry['stage']})")
    return results


def check() -> int:
    report = Report()
    check_versions(report)
    full = yaml.safe_load((HERE / "values-full.yaml").read_text())
    for f in [CHART / "Chart.yaml", CHART / "values.yaml", HERE / "values-full.yaml", HERE / "yamllint.yaml"]:
        yamllint(report, str(f.relative_to(HERE.parent)), f.read_text())
    lints = {"default": lint(report, "default", None), "full": lint(report, "full", full)}
    renders: dict[str, Any] = {}
    with helm.Chart.load(str(CHART)) as chart:
        for label, values in (("default", {}), ("full", full)):
            try:
                chart.validate_schema(values)
                report.ok(f"values.schema.json accepts {label}")
                renders[label] = objects_of(report, label, render(chart, values))
            except helm.HelmError as e:
                report.fail(f"{label}: {type(e).__name__}: {e}")
        bad = bad_values(report, chart)
    json.dump(
        {
            "failures": report.failures,
            "checked": report.checked,
            "skipped_validation": report.skipped,
            "lint": lints,
            "bad_values": bad,
            "renders": renders,
        },
        sys.stdout,
        indent=1,
    )
    print()
    return 1 if report.failures else 0


def render_sets(values_file: str) -> int:
    sets = json.loads(pathlib.Path(values_file).read_text())
    out = []
    failed = False
    with helm.Chart.load(str(CHART)) as chart:
        for i, values in enumerate(sets):
            report = Report()
            try:
                chart.validate_schema(values)
                objects = objects_of(report, f"set {i}", render(chart, values))
            except helm.HelmError as e:
                report.fail(f"set {i}: {type(e).__name__}: {e}")
                objects = {}
            failed |= bool(report.failures)
            out.append({"failures": report.failures, "objects": objects})
    json.dump(out, sys.stdout, indent=1)
    print()
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["check"]:
        return check()
    if len(argv) == 3 and argv[1] == "render":
        return render_sets(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
