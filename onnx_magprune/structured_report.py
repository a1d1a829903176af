"""The terminal table of a structured removal (the JSON is the report's ``structured`` dict)."""

from __future__ import annotations


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def structured_lines(s: dict) -> list[str]:
    lines = []
    rows = [["producer", "op", "chain", "consumers", "units", "params", "bytes", "selection", "criterion"]]
    for g in s["groups"]:
        rows.append([g["producer"], g["producer_op"], ",".join(g["chain"]) or "-", ",".join(g["consumers"]),
                     f"{g['units_before']:,} -> {g['units_after']:,}",
                     f"{g['params_before']:,} -> {g['params_after']:,}",
                     f"{g['bytes_before']:,} -> {g['bytes_after']:,}", g["selection"],
                     g.get("criterion", "-") + (" + refit" if g.get("refit") else "")])
    if s["groups"]:
        lines += _columns(rows, right={4, 5, 6})
    else:
        lines.append("no unit group can be removed")
    if s["skipped"]:
        lines += ["", f"skipped groups ({len(s['skipped'])}):"]
        lines += ["  " + r for r in _columns([["producer", "op", "units", "reason"]] + [
            [k["producer"], k["producer_op"], str(k["units"]), k["reason"]] for k in s["skipped"]], right=set())]
    t = s["totals"]
    lines += ["", f"units: {t['units_before']:,} -> {t['units_after']:,} (removed {t['units_removed']:,}, "
                  f"asked for {t['target_removed']:,})",
              f"parameters: {t['params_before']:,} -> {t['params_after']:,}; model bytes: "
              f"{t['model_bytes_before']:,} -> {t['model_bytes_after']:,}"]
    return lines
