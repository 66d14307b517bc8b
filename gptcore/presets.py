"""Switch params.yaml to a preset, in place, keeping its comments and every key the preset leaves alone.

python -m gptcore.presets shakespeare_char     # nanoGPT's shakespeare_char settings, for a GPU
python -m gptcore.presets gpt2_small           # GPT-2 small: 12 layers, 12 heads, 768 dims, block 1024
python -m gptcore.presets tiny_cpu             # back to the CPU-sized defaults
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from gptcore.files import atomic_write_text
from gptcore.params import PRESETS_DIR, ParamsError, parse_params


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def apply_preset(name: str, params_path: str | Path = "params.yaml") -> dict:
    """Merge the preset `name` (PRESETS_DIR/<name>.yaml) into params_path; validate the result before writing it."""
    preset_file = PRESETS_DIR / f"{name}.yaml"
    if not preset_file.is_file():
        raise ParamsError(f"unknown preset {name!r}: available presets are {', '.join(available())}")
    overrides = yaml.safe_load(preset_file.read_text(encoding="utf-8")) or {}
    rt = YAML()  # round-trip mode keeps comments and key order
    params_path = Path(params_path)
    doc = rt.load(params_path.read_text(encoding="utf-8"))
    for section, values in overrides.items():
        if section not in doc:
            doc[section] = {}
        for key, value in values.items():
            doc[section][key] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    parse_params(yaml.safe_load(buf.getvalue()), params_path)  # refuse to write an invalid file
    atomic_write_text(params_path, buf.getvalue())
    return overrides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=available())
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        overrides = apply_preset(args.preset, args.params)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    changed = ", ".join(f"{s}.{k}={v}" for s, vals in overrides.items() for k, v in vals.items())
    print(f"{args.params}: applied preset {args.preset}: {changed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
