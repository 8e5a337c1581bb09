"""`check --junit FILE`: the verdicts as a JUnit XML report, one testcase per claim (PASS passes, VIOLATED is a
failure, INCONCLUSIVE is skipped, each with its reason), for CI systems that display test reports."""
from __future__ import annotations

import xml.etree.ElementTree as ET

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
    if r.get("p") is not None:
        low, high = (r.get(k) if r.get(k) is not None else float("nan") for k in ("p_low", "p_high"))
        lines.append(f"p̂ {r['p']:.4g}, 95% CI [{low:.4g}, {high:.4g}], "
                     f"claimed {'≤' if r.get('relation') == 'upper_bound' else '='} {r.get('claimed_p')}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    lines += [f"code: {c}" for c in r.get("code") or []]
    return "\n".join(lines)
