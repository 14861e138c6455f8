#!/usr/bin/env python3
"""One benchmark run's JSON record, with what the shell measured around it.

    annotate_run.py RESULT TIME_FILE [KEY=VALUE ...]

RESULT is a file holding one JSON object (a --json file), or a benchmark's
stdout whose last line starting with "{" is its record.  TIME_FILE holds
`/usr/bin/time -f '%U %S %e %M'`: the record gains process_cpu_s,
process_wall_s and process_peak_rss_mb.  Each KEY=VALUE is added as well
(as a number when it parses as one); keys the record already has are kept.
Prints the record as one JSON line.  Used by comparison.sh and
demo_comparison.sh.
"""

import json
import sys


def value(text):
    try:
        return float(text)
    except ValueError:
        return text


def main():
    result, time_file, *pairs = sys.argv[1:]
    text = open(result).read()
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        rec = json.loads([x for x in text.splitlines() if x.startswith("{")][-1])
    user, system, wall, max_kb = open(time_file).read().split()[:4]
    rec["process_cpu_s"] = round(float(user) + float(system), 2)
    rec["process_wall_s"] = float(wall)
    rec["process_peak_rss_mb"] = round(int(max_kb) / 1024, 1)
    for pair in pairs:
        key, _, text = pair.partition("=")
        rec.setdefault(key, value(text))
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
