"""Claims named on the command line: shipped or plug-in claims by name or id, or claim files by path, whose
conf folder (its experiment/ presets) is then read like a plug-in's (harness/registry.py)."""
from __future__ import annotations

from pathlib import Path

from ratebench.analysis.claims import Claim, find_claim, load_claim
from ratebench.registry import add_conf_folder, claim_conf_folder, conf_folders


def claim_folders() -> list[Path]:
    """Every conf folder's claims/, in search order."""
    return [folder / "claims" for folder in conf_folders()]


def claims_by_name(names: list[str]) -> list[Claim]:
    """Claims from names, ids or paths, all parsed before any compute. A claim file given by path adds its
    conf folder (claim_conf_folder) to the search path of this process and of the runs it starts, so its
    experiment is found and run like a shipped one."""
    claims = []
    for name in names:
        path = find_claim(name, claim_folders())
        if path.is_file() and path.absolute().parent not in [f.absolute() for f in claim_folders()]:
            add_conf_folder(claim_conf_folder(path))
        claims.append(load_claim(path))
    return claims
