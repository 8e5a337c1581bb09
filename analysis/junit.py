"""`check --junit FILE`: the verdicts as a JUnit XML report, one testcase per claim (PASS passes, VIOLATED is a
failure, INCONCLUSIVE is skipped, each with its reason), for CI systems that display test reports."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from ratebench.analysis.tables import estimate_digits

SUITE = "ratebench check"


def junit_xml(rows: list[dict]) -> str:
    """The XML text of one testsuite over check's verdict rows (claim, algorithm, verdict, reason, ...)."""
    failures = sum(r["verdict"] == "VIOLATED" for r in rows)
    skipped = sum(r["verdict"] == "INCONCLUSIVE" for r in rows)
    suites = ET.Element("testsuites", name=SUITE, tests=str(len(rows)), failures=str(failures), skipped=str(skipped))
    suite = ET.SubElement(suites, "testsuite", name=SUITE, tests=str(len(rows)), failures=str(failures),
                          errors="0", skipped=str(skipped))
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname=f"ratebench.claims.{r.get('algorithm', '')}", name=r["claim"])
        message = f"{r['verdict']}: {r['reason']}"
        if r["verdict"] == "VIOLATED":
            ET.SubElement(case, "failure", message=message, type="VIOLATED").text = _details(r)
        elif r["verdict"] == "INCONCLUSIVE":
            ET.SubElement(case, "skipped", message=message).text = _details(r)
        ET.SubElement(case, "system-out").text = _details(r)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _details(r: dict) -> str:
    lines = [f"{r['claim']}: {r['verdict']} — {r['reason']}"]
    est = r.get("estimate") or {}
    if est.get("value") is not None:
        low, high = (est.get(k) if est.get(k) is not None else float("nan") for k in ("low", "high"))
        digits = estimate_digits(est.get("name"), default=4)
        lines.append(f"{est['name']} {est['value']:.{digits}g}, 95% CI [{low:.{digits}g}, {high:.{digits}g}], "
                     f"claimed {r.get('claimed')} ({r.get('form', 'polynomial')})")
    for pv in r.get("per_value") or []:
        lines.append(f"{r.get('parameter')} = {pv.get('value')}: {pv.get('verdict')}, p̂ {pv.get('p')} "
                     f"[{pv.get('p_low')}, {pv.get('p_high')}] vs predicted {pv.get('predicted')}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    lines += [f"code: {c}" for c in r.get("code") or []]
    return "\n".join(lines)
