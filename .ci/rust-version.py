"""Fails when a dependency declares a rust-version above the crate's own."""
import json
import subprocess
import sys


def parse(version):
    return tuple(int(part) for part in version.split("."))


meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
)
ours = next(p for p in meta["packages"] if p["id"] in meta["workspace_members"])
declared = parse(ours["rust_version"])
above = [
    f"{p['name']} {p['version']} needs {p['rust_version']}"
    for p in meta["packages"]
    if p.get("rust_version") and parse(p["rust_version"]) > declared
]
if above:
    print(f"rust-version {ours['rust_version']} is below what dependencies need:")
    print("\n".join(sorted(above)))
    sys.exit(1)
print(f"rust-version {ours['rust_version']}: no dependency needs more")
