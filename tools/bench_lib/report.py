"""The table of absolute figures and ratios, and the JSON document."""

from __future__ import annotations

from .workloads import ROW_BY_ID, row_title


def fmt_num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e5:
        return f"{v / 1e3:.0f}k"
    if a >= 1e4:
        return f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(r) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def value(doc: dict, system: str, row: str):
    r = doc["results"].get(system, {}).get(row)
    if not r or "value" not in r:
        return None
    return r["value"]


def ratios(doc: dict) -> dict:
    """{reference: {row: pmfs / reference}} for the rows both have."""
    out = {}
    for ref in doc["order"]:
        if ref == "pmfs" or ref not in doc["results"]:
            continue
        out[ref] = {}
        for row in doc["rows"]:
            a, b = value(doc, "pmfs", row["id"]), value(doc, ref, row["id"])
            if a is not None and b:
                out[ref][row["id"]] = a / b
    return out


def goal(doc: dict) -> dict:
    """The issue's goal: pmfs ahead of both pyfuse3 examples on every row, and at or
    above the C passthrough on seq write/read, create, rename and unlink."""
    py = [s for s in ("pyfuse3_passthroughfs", "pyfuse3_tmpfs") if s in doc["results"]]
    out = {}
    for row in doc["rows"]:
        rid = row["id"]
        mine = value(doc, "pmfs", rid)
        if mine is None:
            continue
        refs = list(py) + (["passthrough_ll"] if row["goal_c"] and
                           "passthrough_ll" in doc["results"] else [])
        missed = []
        for ref in refs:
            other = value(doc, ref, rid)
            if other is None:
                continue
            at_least = ref == "passthrough_ll"  # "at or above" vs "ahead of"
            if row["higher_is_better"]:
                beats = mine >= other if at_least else mine > other
            else:
                beats = mine <= other if at_least else mine < other
            if not beats:
                missed.append(ref)
        if refs:
            out[rid] = {"met": not missed, "missed": missed}
    return out


def table_rows(doc: dict) -> list[list[str]]:
    order = [s for s in doc["order"] if s in doc["results"]]
    refs = [s for s in order if s != "pmfs"]
    has_pmfs = "pmfs" in order
    shorts = [doc["systems"][s]["short"] for s in order]
    rat = doc.get("ratios", {})
    g = doc.get("goal", {})
    params = doc["params_obj"]
    rows = []
    head = ["workload", "unit"] + shorts
    if has_pmfs:
        head += ["pmfs/" + doc["systems"][r]["short"] for r in refs]
        if g:
            head.append("goal")
    rows.append(head)
    for row in doc["rows"]:
        rid = row["id"]
        if not any(rid in doc["results"][s] for s in order):
            continue
        line = [row_title(ROW_BY_ID[rid], params) + ("" if row["higher_is_better"]
                                                     else " (lower=better)"),
                row["unit"]]
        for s in order:
            r = doc["results"][s].get(rid)
            if r is None:
                line.append("-")
            elif "value" in r:
                line.append(fmt_num(r["value"]) + ("~" if r.get("capped") else ""))
            else:
                line.append("err")
        if has_pmfs:
            for ref in refs:
                line.append(fmt_ratio(rat.get(ref, {}).get(rid)))
            if g:
                gr = g.get(rid)
                if gr is None:
                    line.append("")
                elif gr["met"]:
                    line.append("ok")
                else:
                    line.append("MISS:" + ",".join(doc["systems"][m]["short"]
                                                   for m in gr["missed"]))
        rows.append(line)
    return rows


def table(doc: dict) -> str:
    rows = table_rows(doc)
    head = rows[0]
    order = [s for s in doc["order"] if s in doc["results"]]
    refs = [s for s in order if s != "pmfs"]
    has_pmfs = "pmfs" in order
    g = doc.get("goal", {})
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = []
    nsys = 2 + len(order)
    for k, r in enumerate(rows):
        cells = []
        for i, c in enumerate(r):
            if i == 0:
                cells.append(c.ljust(widths[i]))
            elif i == len(head) - 1 and g and has_pmfs:
                cells.append(c.ljust(widths[i]))
            else:
                cells.append(c.rjust(widths[i]))
            if i == nsys - 1 and has_pmfs and refs:
                cells.append("|")
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def markdown(doc: dict) -> str:
    """The table as GitHub markdown (for docs/PERFORMANCE.md)."""
    rows = table_rows(doc)
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    for r in rows[1:]:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"pmfs benchmark ({doc['mode']} mode), {doc['machine']['date']}",
             f"machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, "
             f"{m['memory_gib']} GiB RAM; Python {m['python']}, {m['fio']}, libfuse "
             f"{m['libfuse']}, pyfuse3 {m['pyfuse3']}; everything on /dev/shm",
             f"pmfs commit path: {m.get('pmfs_commit_path', 'unknown')}"]
    la0, la1 = doc.get("loadavg_start") or [0], doc.get("loadavg_end") or [0]
    rounds = doc["params"].get("repeat", 1)
    lines.append(f"run: {doc.get('seconds', 0):.0f} s, {rounds} round(s)"
                 + (" (median shown)" if rounds > 1 else "")
                 + f", all systems mounted side by side, each step on every system in turn; "
                 f"load average {la0[0]:.2f} at start, {la1[0]:.2f} at end")
    if max(la0[0], la1[0]) > 0.7:
        lines.append("WARNING: other processes were running on this machine; the figures "
                     "are noisy (compare ratios within this run only)")
    lines.append("")
    lines.append(table(doc))
    lines.append("")
    lines.append("~ = hit the time cap (fewer operations than planned; see JSON).  "
                 "MB/s = 10^6 bytes/s.  Ratios are pmfs / reference.")
    cm = doc["cold_method"]
    lines.append(f"cold = right after {cm} (kernel page cache for reads, dentries and "
                 f"inodes for stat), so every access reaches the daemon; warm = the same "
                 f"access repeated at once.")
    if doc.get("goal"):
        g = doc["goal"]
        met = sum(1 for v in g.values() if v["met"])
        lines.append(f"goal (ahead of both pyfuse3 examples on every row; >= C passthrough "
                     f"on seq write/read, create, rename, unlink): {met}/{len(g)} rows met")
    lines.append("")
    lines.append("systems:")
    for sid in doc["order"]:
        s = doc["systems"][sid]
        state = s["description"] if s["available"] else f"NOT MEASURED: {s['error']}"
        lines.append(f"  {s['short']:<9} {sid}: {state}")
        for n in s.get("notes", []):
            lines.append(f"  {'':<9}   note: {n}")
    errs = []
    for sid, rr in doc["results"].items():
        for rid, r in rr.items():
            if "error" in r:
                errs.append(f"  {sid} {rid}: {r['error']}")
    if errs:
        lines.append("")
        lines.append("errors:")
        lines.extend(errs)
    return "\n".join(lines)
