#!/usr/bin/env bash
# Wheels for a lent GPU machine that has no network (the H200 image in /work/.library/device/KINDS.md):
# what ctsearch + ray core + ray[data] + ray[train] need and that image lacks, for `carry: [".whl"]`.
#   bash bench/gpu_wheels.sh [--python 3.12] [DIR]       (from the repo root; DIR defaults to .whl)
# --python 3.11 builds the same set for cp311, to test the repacked ray on a 3.11 machine.
# The device command then starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# DIR's *.whl are deleted first: two versions of one package in it stop the whole install.
#
# ray's wheel (79 MB) is repacked to fit the 64 MiB the working tree may carry: without ray/jars
# (Java), ray/rllib, ray/llm, the dashboard UI (client/build/static/{js,media}, speedscope: its
# web page is blank, its HTTP API works), the examples folders and *.js.map; its ELF files
# (raylet, gcs_server, _raylet.so, the vendored .so) go through `strip --strip-unneeded`; RECORD
# is rewritten with the new hashes and sizes. ray/dashboard's Python modules stay: the raylet
# starts the dashboard agent and the runtime-env agent from them. Ray Serve's Python code stays
# too (small), but its web deps are not carried: `ctsearch serve` cannot run there. nibabel and
# pydicom lose their test suites and test data. About 57 MiB in all.
# Without ray[default]'s deps (aiohttp_cors, opencensus, ...) Ray runs its dashboard in minimal mode
# there, with no HTTP server: no dashboard, no State API, no `ray job submit`; local ray.init,
# Ray Data and Ray Train work (checked with the cp311 build and those modules hidden).
# Not carried because the image has them (KINDS.md, read 2026-11-17; versions there not recorded):
# torch, torchvision, numpy, pandas, pyarrow, fsspec, typer, rich, click, pillow, safetensors,
# grpcio, aiohttp, protobuf, msgpack, filelock, packaging, pyyaml, requests, attrs, psutil.
set -euo pipefail

py=3.12
while [ $# -gt 0 ]; do
    case $1 in
        --python) py=$2; shift 2 ;;
        -h|--help) sed -n 2,6p "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
dest=${1:-.whl}
limit_mib=60

# Pinned to the versions ctsearch's dev venv was tested with (pip list there).
ray_pin=ray==2.60.0
pins=(
    # ray core: jsonschema and its own needs (attrs is in the image)
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    # ray[train]: pydantic (+ its needs), tensorboardX
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    tensorboardX==2.6.5
    # pydantic 2.14 wants a recent typing_extensions; the image's version is not recorded
    typing-extensions==4.16.0
    # ctsearch
    nibabel==5.4.2 pydicom==3.0.2 faiss-cpu==1.15.1
)
[ "$py" = 3.11 ] && pins+=(importlib-resources==7.1.0)  # nibabel needs it below 3.12

mkdir -p "$dest"
rm -f "$dest"/*.whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pip_dl() {
    nice -n 10 python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
pip_dl -d "$tmp/ray" "$ray_pin"
pip_dl -d "$dest" "${pins[@]}"

command -v strip >/dev/null || { echo "needs binutils' strip" >&2; exit 1; }
# nibabel and pydicom are repacked too, without their test suites and test data (3.8 MiB together).
mkdir -p "$tmp/orig"
mv "$dest"/nibabel-*.whl "$dest"/pydicom-*.whl "$tmp/orig/"
nice -n 10 python3 - "$dest" "$tmp/work" "$tmp/ray"/ray-*.whl "$tmp/orig"/*.whl <<'PY'
import base64, hashlib, os, shutil, subprocess, sys, zipfile

dest, tmp, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]

def dropped(dist, path):
    if dist == "ray":
        # The dashboard's build folder stays, without its JS: the dashboard head (started where
        # ray[default]'s deps are) refuses to start without build/ and build/static/.
        return (path.startswith(("ray/jars/", "ray/rllib/", "ray/llm/",
                                 "ray/dashboard/client/build/static/js/",
                                 "ray/dashboard/client/build/static/media/",
                                 "ray/dashboard/client/build/speedscope-"))
                or "/examples/" in path or "/tests/" in path or path.endswith(".js.map"))
    if dist == "nibabel":
        return "/tests/" in path
    if dist == "pydicom":
        return path.startswith("pydicom/data/test_files/")
    return False

def digest(path):
    h = hashlib.sha256(open(path, "rb").read()).digest()
    return "sha256=" + base64.urlsafe_b64encode(h).rstrip(b"=").decode()

for src in wheels:
    name = os.path.basename(src)
    dist = name.split("-")[0]
    work = os.path.join(tmp, dist)
    kept = dropped_bytes = 0
    with zipfile.ZipFile(src) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            if dropped(dist, info.filename):
                dropped_bytes += info.compress_size
                continue
            out = os.path.join(work, info.filename)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as f, open(out, "wb") as g:
                shutil.copyfileobj(f, g)
            os.chmod(out, (info.external_attr >> 16) & 0o777 or 0o644)
            kept += 1
    print(f"{dist}: kept {kept} files, dropped {dropped_bytes / 2**20:.2f} MiB (compressed)")
    dist_info = next(d for d in os.listdir(work) if d.endswith(".dist-info"))

    if dist == "ray":
        # No console script may point at what is gone.
        ep = os.path.join(work, dist_info, "entry_points.txt")
        if os.path.exists(ep):
            lines = [l for l in open(ep) if "ray.rllib" not in l and "ray.llm" not in l]
            open(ep, "w").writelines(lines)
        before = after = 0
        for root, _, files in os.walk(work):
            for fn in files:
                p = os.path.join(root, fn)
                with open(p, "rb") as f:
                    if f.read(4) != b"\x7fELF":
                        continue
                before += os.path.getsize(p)
                subprocess.run(["strip", "--strip-unneeded", p], check=True)
                after += os.path.getsize(p)
        print(f"ray: strip --strip-unneeded on its ELF files: "
              f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB")

    # RECORD rewritten with the hashes and sizes of what is there now.
    record = f"{dist_info}/RECORD"
    paths = []
    for root, _, files in os.walk(work):
        for fn in files:
            paths.append(os.path.relpath(os.path.join(root, fn), work).replace(os.sep, "/"))
    paths = sorted(p for p in paths if p != record)
    paths.sort(key=lambda p: p.startswith(dist_info + "/"))  # dist-info last, as wheels have it
    with open(os.path.join(work, record), "w") as f:
        for p in paths:
            full = os.path.join(work, p)
            f.write(f"{p},{digest(full)},{os.path.getsize(full)}\n")
        f.write(f"{record},,\n")

    out = os.path.join(dest, name)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths + [record]:
            full = os.path.join(work, p)
            info = zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | (os.stat(full).st_mode & 0o777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(full, "rb") as f:
                z.writestr(info, f.read(), compresslevel=9)
    shutil.rmtree(work)
    print(f"{dist}: {name}: {os.path.getsize(src) / 2**20:.2f} -> {os.path.getsize(out) / 2**20:.2f} MiB")
PY

echo "--- $dest (cp${py/./}):"
total=0
for w in "$dest"/*.whl; do
    s=$(stat -c %s "$w"); total=$((total + s))
    awk -v s="$s" -v n="$(basename "$w")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" -v l="$limit_mib" 'BEGIN { printf "%8.2f MiB  total (limit %s MiB)\n", s / 1048576, l }'
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
    echo "total is over $limit_mib MiB" >&2
    exit 1
fi
