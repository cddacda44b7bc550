"""The README a bundle carries: what each file is and how to build and run the runner on the board."""

from __future__ import annotations

from ..targets.build import build_commands
from .target import runner_path

NCNN_DIR_PLACEHOLDER = {"x86_64": "/path/to/ncnn/install/lib/cmake/ncnn",
                        "aarch64": "/path/to/ncnn-aarch64/lib/cmake/ncnn"}  # fmt: skip


def readme_build_commands(arch: str) -> list[str]:
    """The build commands a bundle's README gives for `arch` (x86_64: natively on the board; aarch64:
    cross-compiling on an x86_64 host): targets.build.build_commands, which build_runner runs here and
    `deploy --build native` runs on a board, with placeholders for the paths."""
    build = "build" if arch == "x86_64" else f"build-{arch}"
    cmds = build_commands(".", build, NCNN_DIR_PLACEHOLDER[arch], arch, jobs='"$(nproc)"')
    return [" ".join(cmd) for cmd in cmds]


def readme(meta: dict, has_report: bool, arches: tuple[str, ...] = ()) -> str:
    model = meta.get("model", "model")
    inp = meta["input"]
    report = "- `report.json`: the parity report this bundle was checked with\n" if has_report else ""
    outputs = ", ".join(f"`{o}`" for o in meta["outputs"])
    pre = f"{inp.get('color', 'rgb')}, {inp.get('resize', 'resize')}"
    native = "\n".join(readme_build_commands("x86_64"))
    cross = "\n".join(readme_build_commands("aarch64"))
    shipped = "".join(f"- `{runner_path(a)}`: the runner cross-built for {a} (static, checked under qemu)\n"
                      for a in arches)  # fmt: skip
    prebuilt = (
        f"""
## The cross-built runner in this bundle

`{runner_path(arches[0])}` is one statically linked file: it needs nothing installed on the board (no
libncnn, no OpenCV; it decodes photos with ncnn's own stb_image-based reader). deploytool checked it
under `qemu-aarch64 -cpu cortex-a72` before writing this bundle (report.json, backend
`ncnn-cpp@aarch64`). On the board:

```sh
./{runner_path(arches[0])} meta.json photo.jpg
```

or from the machine that made the bundle: `deploytool deploy . --to pi@board:models/{model}`.
"""
        if arches
        else ""
    )
    return f"""# {model}: ncnn bundle

Made by deploytool. Task `{meta["task"]}`, input `{inp["name"]}` {inp["width"]}x{inp["height"]}
({pre}), outputs {outputs}.

- `model.ncnn.param`, `model.ncnn.bin`: the network
- `meta.json`: input name and size, preprocessing (value = (pixel - mean_vals) * norm_vals), outputs,
  labels, task settings and, when tuned (`deploytool bench --tune`), `ncnn_options`: the ncnn::Option
  fields both runners set (printed back in their JSON)
- `CMakeLists.txt`, `src/`: the C++ runner `deploytool_runner` (ncnn + OpenCV + nlohmann-json)
- `toolchains/aarch64-linux-gnu.cmake`: cross-compiling from an x86_64 host
- `run_ncnn.py`: the same runner in Python (ncnn, numpy, OpenCV only)
{shipped}{report}- `.deploytool-bundle`: lists the files above; `deploytool bundle` replaces only
  these (anything else you put here, such as `build/`, is kept)
{prebuilt}
## C++ on the board (native build)

Needs libncnn built and installed for the board (see https://github.com/Tencent/ncnn/wiki/how-to-build),
then (Debian/Ubuntu):

```sh
sudo apt-get install -y build-essential cmake libopencv-dev nlohmann-json3-dev
{native}
./build/deploytool_runner meta.json photo.jpg
```

`deploytool deploy . --to USER@BOARD:DIR --build native --ncnn-dir /path/to/ncnn/install/lib/cmake/ncnn`
runs these same two cmake commands on the board over SSH.

Options: `--threads N`, `--repeat N` (average latency over N runs), `--dump-raw DIR` (writes every raw
output as `<image-stem>.<blob>.npy` and the preprocessed input as `<image-stem>.input.npy`).
An input ending in `.npy` is taken as an already preprocessed float32 (1,C,H,W) tensor.
It prints one JSON document: per image `top_k` (index, score, prob, label) or `detections`
(class_id, class name, score, box x1,y1,x2,y2 in original image pixels). Errors: one line on stderr,
exit 2.

## Cross-compiling for aarch64 (on an x86_64 Debian/Ubuntu host)

libncnn for aarch64 with ncnn's simpleocv (from deploytool's repository: `ARCH=aarch64
scripts/build_ncnn.sh`, or ncnn's own CMake with this toolchain file and `-DNCNN_SIMPLEOCV=ON`), then:

```sh
sudo apt-get install -y g++-aarch64-linux-gnu cmake nlohmann-json3-dev
{cross}
```

The result, `build-aarch64/deploytool_runner`, is static and decodes photos with stb_image (no OpenCV
on the board). stb_image and OpenCV's libjpeg decode JPEG slightly differently (about 0.1 pixel level on
average here); deploytool reports that apart from the model's own error (`image_path` in report.json).

## Python

```sh
pip install ncnn numpy opencv-python-headless
python3 run_ncnn.py meta.json photo.jpg
```

Same options and the same JSON as the C++ runner; both preprocess with ncnn's own
`from_pixels_resize`, so their raw outputs agree to ~1e-5.
"""
