"""Which of qwenclip's own code a fuzz corpus newly covers, between two coverage dumps.

    python3 fuzz/coverage_diff.py OLD.coverage NEW.coverage

The dumps are the `<target>.coverage` files `fuzz/run.sh` leaves in its log folder (libFuzzer's
`-runs=0 -print_coverage=1` over the corpus), both from the same fuzz binary. A function's
edge count mixes our lines with code inlined into it (serde_json's parser inside every
`read_json::<T>`, the derived `Deserialize` impls), so it keeps growing with every new JSON
shape after our own logic has stopped; libFuzzer lists each uncovered PC of a reached
function with its source line, inlined code under the inlined line. The PCs a function
stopped listing are the ones the newer corpus covers; they are counted here by where their
line is: a hand-written line of src/, a `#[derive(...)]` line (or any line of a function a
derive expands to: serde's field matching is placed on the fields' lines), line 0
(compiler-generated), or another crate. A function no corpus input reached before is listed
whole and counted apart (libFuzzer gives no line for a covered PC). A target's own logic has
plateaued when a chunk reaches no new hand-written function and newly covers no PC on a
hand-written line. A corpus libFuzzer reduced can also stop covering a PC: listed apart,
never netted.
"""

import re
import sys
from collections import Counter
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src") + "/"
FUNC = re.compile(r"^COVERED_FUNC: hits: \d+ edges: (\d+)/\d+ (.*) (\S+)$")
NAME = re.compile(r"\((\S+:\d+)\)$")
KINDS = ("hand-written", "derive", "generated", "dependency")


def read(path):
    """Own function -> (covered edges, Counter of uncovered PC locations)."""
    funcs, current = {}, None
    for line in Path(path).read_text(errors="replace").splitlines():
        m = FUNC.match(line)
        if m:
            covered, name, loc = m.groups()
            current = f"{name} ({loc.removeprefix(SRC)})" if loc.startswith(SRC) else None
            if current:
                funcs[current] = (int(covered), Counter())
        elif current and line.startswith("  UNCOVERED_PC: "):
            funcs[current][1][line.split(": ", 1)[1]] += 1
    if not funcs:
        sys.exit(f"{path}: no COVERED_FUNC line under {SRC}: not a -print_coverage=1 dump?")
    return funcs


def kind(location, sources):
    file, _, line = location.rpartition(":")
    if not file.startswith(SRC):
        return "dependency"
    if line == "0":
        return "generated"
    if file not in sources:
        sources[file] = Path(file).read_text().splitlines()
    text = sources[file][int(line) - 1] if 0 < int(line) <= len(sources[file]) else ""
    return "derive" if "#[derive(" in text else "hand-written"


def by_kind(locations, sources, derived):
    """`derived`: the function is a derive's expansion, so its lines of src/ are derive lines."""
    kinds = Counter()
    for location, n in locations.items():
        k = kind(location, sources)
        kinds["derive" if derived and k == "hand-written" else k] += n
    return kinds


def main(old_path, new_path):
    old, new = read(old_path), read(new_path)
    sources, gained_all, lost_all, reached = {}, Counter(), Counter(), Counter()
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            print(f"newly reached: {name}: {new[name][0]} edges")
            reached[kind(SRC + NAME.search(name)[1], sources)] += 1
            continue
        if name not in new:
            print(f"no longer reached: {name}: {old[name][0]} edges")
            continue
        derived = kind(SRC + NAME.search(name)[1], sources) == "derive"
        gained = by_kind(old[name][1] - new[name][1], sources, derived)
        lost = by_kind(new[name][1] - old[name][1], sources, derived)
        if gained or lost:
            changes = [
                "/".join(([f"+{gained[k]}"] if gained[k] else []) + ([f"-{lost[k]}"] if lost[k] else []))
                + f" {k}"
                for k in KINDS
                if gained[k] or lost[k]
            ]
            print(f"{name}: {', '.join(changes)}")
        gained_all.update(gained)
        lost_all.update(lost)
    functions = ", ".join(f"{reached[k]} {k}" for k in KINDS[:3])
    print(
        f"newly reached functions: {functions}; "
        f"newly covered PCs: {', '.join(f'{gained_all[k]} {k}' for k in KINDS)}; "
        f"no longer covered: {', '.join(f'{lost_all[k]} {k}' for k in KINDS)}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
